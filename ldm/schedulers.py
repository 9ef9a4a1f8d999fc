"""The one registry of noise schedulers: the training schedule made from the config, and the sampling
schedulers a trained model can be run with. Training, validation, evaluation, generation and the config's
``sample.scheduler`` all take their names from ``SAMPLERS``."""

from __future__ import annotations

import typing

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from .config import SamplerName

# Name -> diffusers scheduler class; each is built from the training schedule's config.
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
assert typing.get_args(SamplerName) == tuple(SAMPLERS), "the config's sample.scheduler type lists these names"


def make_noise_scheduler(d) -> DDPMScheduler:
    """The training schedule (``d``: the config's ``diffusion`` section) as a diffusers scheduler. It is saved
    with the pipeline and the diffusion math is built from its config, so both always agree."""
    return DDPMScheduler(
        num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule, beta_start=d.beta_start,
        beta_end=d.beta_end, prediction_type=d.prediction_type, rescale_betas_zero_snr=d.rescale_betas_zero_snr,
        variance_type="learned_range" if d.learned_variance else "fixed_small",
        clip_sample=False,  # latents are not bounded like pixels
        timestep_spacing="trailing",  # sampling starts at t = T-1 (Lin et al. 2024)
        steps_offset=1,  # what StableDiffusionPipeline expects (it rewrites other values on load)
    )


def load_noise_scheduler(folder) -> DDPMScheduler:
    """The training schedule of a saved pipeline (its ``scheduler/`` folder), whatever class saved it."""
    return DDPMScheduler.from_config(DDPMScheduler.load_config(folder), clip_sample=False)


def sampling_scheduler(train_scheduler, name: str):
    """A sampler of ``SAMPLERS`` on the same schedule and prediction type as ``train_scheduler``."""
    if name not in SAMPLERS:
        raise ValueError(f"scheduler {name!r} is not one of {list(SAMPLERS)}")
    return SAMPLERS[name].from_config(train_scheduler.config)
