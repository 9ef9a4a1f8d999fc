"""The one registry of noise schedulers: the training schedule made from the config, and the sampling
schedulers a trained model can be run with. Training, validation, evaluation, generation and the config's
``sample.scheduler`` all take their names from ``SAMPLERS``."""

from __future__ import annotations

import inspect

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

# Name -> diffusers scheduler class; each is built from the training schedule's config.
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


def make_noise_scheduler(d, pixels: bool = False) -> DDPMScheduler:
    """The training schedule (``d``: the config's ``diffusion`` section) as a diffusers scheduler. It is saved
    with the pipeline and the diffusion math is built from its config, so both always agree. ``pixels``: x̂_0 is
    clipped to the image range [-1, 1] when sampling (DDPM's pixel models); latents are not."""
    return DDPMScheduler(
        num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule, beta_start=d.beta_start,
        beta_end=d.beta_end, prediction_type=d.prediction_type, rescale_betas_zero_snr=d.rescale_betas_zero_snr,
        variance_type="learned_range" if d.learned_variance else "fixed_small",
        clip_sample=pixels,  # latents are not bounded like pixels
        timestep_spacing="trailing",  # sampling starts at t = T-1 (Lin et al. 2024)
        steps_offset=1,  # what StableDiffusionPipeline expects (it rewrites other values on load)
    )


def load_noise_scheduler(folder) -> DDPMScheduler:
    """The training schedule of a saved pipeline (its ``scheduler/`` folder), whatever class saved it."""
    config = DDPMScheduler.load_config(folder)
    # A pixel model saves clip_sample=true; configs that do not say (other scheduler classes) are latent ones.
    return DDPMScheduler.from_config(config, clip_sample=bool(config.get("clip_sample", False)))


def sampling_scheduler(train_scheduler, name: str):
    """A sampler of ``SAMPLERS`` on the same schedule and prediction type as ``train_scheduler``."""
    if name not in SAMPLERS:
        raise ValueError(f"scheduler {name!r} is not one of {list(SAMPLERS)}")
    return SAMPLERS[name].from_config(train_scheduler.config)


VARIANCES = ("learned", "fixed_small", "fixed_large")


def with_variance(scheduler, variance: str | None):
    """``scheduler`` sampling a learned-variance model with its learned Σ ("learned": the default where the
    scheduler can use it, the DDPM family), or with a fixed one ("fixed_small": β̃_t, "fixed_large": β_t) that
    ignores the variance channels. None keeps the scheduler as it is."""
    if variance is None:
        return scheduler
    if variance not in VARIANCES:
        raise ValueError(f"variance {variance!r} is not one of {list(VARIANCES)}")
    if "variance_type" not in inspect.signature(type(scheduler).__init__).parameters:
        raise ValueError(f"{type(scheduler).__name__} has no variance setting: --variance works with ddpm")
    return scheduler.__class__.from_config(scheduler.config,
                                           variance_type="learned_range" if variance == "learned" else variance)
