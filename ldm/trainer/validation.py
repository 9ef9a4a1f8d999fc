"""Validation during a diffusion run: a loss on held-out images at fixed timesteps and noise (comparable from
step to step), a grid of samples of fixed prompts and seeds, and, on built-in data, the built-in scorer.

Runs on the main process with whole (unwrapped) modules; strategies that shard the weights are refused by the
config check for that reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from PIL import Image

from ldm.eval.scorers import eval_prompts, score
from ldm.eval.scoring import generate_for_prompts
from ldm.models.components import make_pipeline
from pipelines.files import atomic_save
from ldm.engine.records import make_grid
from ldm.models.vae import scaled_sample

logger = logging.getLogger(__name__)


@torch.no_grad()
def validation_loss(objective, unet, text_encoder, inputs, input_ids: torch.Tensor, batch_size: int = 64,
                    loss_type: str = "simple") -> dict:
    """Unweighted loss terms of the objective's fixed validation ``inputs`` (`validation_inputs`), the context of
    each image encoded from its ``input_ids`` by ``text_encoder``; in micro-batches of ``batch_size`` images."""
    device = next(unet.parameters()).device
    was_training = unet.training, text_encoder.training
    unet.eval(), text_encoder.eval()
    sums: dict[str, float] = {}
    for s in range(0, len(inputs), batch_size):
        rows = inputs.rows(slice(s, s + batch_size), device)
        rows.context = text_encoder(input_ids[s:s + batch_size].to(device))[0]
        terms = objective.diffusion.training_losses(objective.network(unet, rows), rows.latents, rows.timesteps,
                                                    rows.noise, loss_type=loss_type)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.double().sum())
    unet.train(was_training[0]), text_encoder.train(was_training[1])
    return {f"val_{k}": v / len(inputs) for k, v in sums.items()}


def check_latent_scale(mean: torch.Tensor, std: torch.Tensor, scale: float, shift: float,
                       tolerance: float = 0.25, warn: bool = True) -> float:
    """Std of scaled posterior samples; warns when far from 1 (a ``scaling_factor`` unfit for this data).
    Pixels (``warn=False``) keep DDPM's [-1, 1] range whatever their spread."""
    g = torch.Generator().manual_seed(0)
    z0 = scaled_sample(mean, std, torch.randn(mean.shape, generator=g), scale, shift)
    value = float(z0.std())
    if warn and abs(value - 1.0) > tolerance:
        logger.warning("scaled latents have std %.3f, not ~1: the VAE's scaling_factor does not fit this data "
                       "(measure it with train_autoencoder.py or set it in the VAE's config.json)", value)
    return value


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seeds: list[int], num_inference_steps: int,
                guidance_scale: float) -> Image.Image:
    """One row per prompt, one column per seed; each image from its own seeded generator."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in prompts:
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        images += pipe([prompt] * len(seeds), generator=gens, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale).images
    return make_grid(images, ncols=len(seeds))


@torch.no_grad()
def super_resolution_grid(pipe, low_res: torch.Tensor, captions: list[str], seed: int, num_inference_steps: int,
                          guidance_scale: float, noise_level: int) -> Image.Image:
    """Two rows: the low-resolution inputs (V, 3, h, w) in [-1, 1], enlarged, over the stage's outputs."""
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(low_res))]
    out = pipe(captions, image=(low_res + 1) / 2, generator=gens, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, noise_level=noise_level).images
    inputs = [im.resize(out[0].size, Image.Resampling.NEAREST) for im in
              pipe.image_processor.postprocess((low_res / 2 + 0.5).clamp(0, 1), do_denormalize=[False] * len(low_res))]
    return make_grid(inputs + out, ncols=len(low_res))


@torch.no_grad()
def builtin_scores(pipe, dataset: str, num_images: int, num_inference_steps: int, guidance_scale: float) -> dict:
    """The built-in scorer on images of the held-out evaluation prompts (seeds as ``ldm.evaluate``)."""
    base = eval_prompts(dataset)
    per = -(-num_images // len(base))  # ceil: every prompt gets the same number of images, in one batch
    prompts, images = generate_for_prompts(pipe, base, per, batch_size=per * len(base),
                                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    return {f"score_{k}": v for k, v in score(dataset, images, prompts).items() if k.endswith("_accuracy")}


@dataclass
class ValidationSet:
    """The held-out images a run validates on: their posteriors, the first caption of each, and their other
    per-image arrays by name (a super-resolution stage's low-resolution images)."""

    mean: torch.Tensor  # (V, C, h, w)
    std: torch.Tensor  # (V, C, h, w); zeros when training uses the posterior mean
    input_ids: torch.Tensor  # (V, L)
    captions: list[str]
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)


class Validator:
    """``validator(step) -> row``: the held-out loss at every call; from step 1 on also the sample grid
    (``samples/step-N.png``, TensorBoard) and the built-in scores. With EMA on, the EMA weights are used."""

    GRID_IMAGES = 8  # a super-resolution stage's grid: this many validation images

    def __init__(self, engine, comp, objective, unet, text_encoder, data: ValidationSet, prompts: list[str],
                 score_dataset: str | None, batch_size: int):
        """``unet``, ``text_encoder``: unwrapped; ``prompts``: the grid's; ``score_dataset``: the built-in dataset
        whose scorer reads the samples, or None; ``batch_size``: images per forward."""
        self.engine, self.comp, self.objective = engine, comp, objective
        self.unet, self.text_encoder = unet, text_encoder
        self.data, self.prompts, self.score_dataset, self.batch_size = data, prompts, score_dataset, batch_size
        self.inputs = objective.validation_inputs(data.mean, data.std, engine.cfg.train.seed, data.arrays)
        self.low_res = data.arrays.get("low_res")

    def __call__(self, step: int) -> dict:
        engine, cfg = self.engine, self.engine.cfg
        if not engine.accelerator.is_main_process:
            return {}
        s, tc = cfg.sample, cfg.train
        with engine.ema_weights(), engine.accelerator.autocast():
            row = validation_loss(self.objective, self.unet, self.text_encoder, self.inputs, self.data.input_ids,
                                  self.batch_size, cfg.diffusion.loss_type)
            if step > 0:
                unet_mode, te_mode = self.unet.training, self.text_encoder.training
                self.unet.eval(), self.text_encoder.eval()
                pipe = make_pipeline(self.comp, self.unet, self.text_encoder, s.scheduler)
                if self.low_res is not None:
                    k = self.GRID_IMAGES
                    grid = super_resolution_grid(pipe, self.low_res[:k], self.data.captions[:k], s.seeds[0],
                                                 s.num_inference_steps, s.guidance_scale,
                                                 cfg.super_resolution.sample_noise_level)
                else:
                    grid = sample_grid(pipe, self.prompts, s.seeds, s.num_inference_steps, s.guidance_scale)
                atomic_save(lambda p: grid.save(p, format="PNG"), engine.run_dir / "samples" / f"step-{step}.png")
                engine.metrics.image("samples", grid, step)
                if self.score_dataset and tc.score_num_images > 0:
                    row.update(builtin_scores(pipe, self.score_dataset, tc.score_num_images, s.num_inference_steps,
                                              s.guidance_scale))
                self.unet.train(unet_mode), self.text_encoder.train(te_mode)
        return row
