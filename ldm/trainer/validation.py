"""Validation during a diffusion run: a loss on held-out images at fixed timesteps and noise (comparable from
step to step), a grid of samples of fixed prompts and seeds, and, on built-in data, the built-in scorer.

The loss is shared out among the processes; the samples are drawn on the main process from whole modules (under
FSDP, a copy gathered from every process's shards for the time of the validation).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from PIL import Image

from ldm.data.batches import micro_batch_size
from ldm.diffusion.schedulers import sampling_scheduler
from ldm.engine.errors import check_stop
from ldm.engine.records import make_grid
from ldm.eval.scorers import SCORED_DATASETS, eval_prompts, score
from ldm.eval.scoring import generate_for_prompts
from ldm.models.vae import scaled_sample
from pipelines.files import atomic_save

logger = logging.getLogger(__name__)


@torch.no_grad()
def validation_loss(objective, unet, text_encoder, inputs, input_ids: torch.Tensor, batch_size: int = 64,
                    loss_type: str = "simple", accelerator=None) -> dict:
    """Unweighted loss terms of the objective's fixed validation ``inputs`` (`validation_inputs`), the context of
    each image encoded from its ``input_ids`` by ``text_encoder``; in micro-batches of ``batch_size`` images.
    With an ``accelerator`` of several processes, each process takes every n-th micro-batch and the sums are
    added up; every process runs as many forward passes (the last ones of a short share repeat a micro-batch and
    count nothing), as sharded modules need."""
    device = next(unet.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    starts = list(range(0, len(inputs), batch_size))
    mine = starts[rank::world]
    sums: dict[str, torch.Tensor] = {}
    with eval_mode(unet, text_encoder):
        for i in range(-(-len(starts) // world)):
            s, weight = (mine[i], 1.0) if i < len(mine) else (starts[0], 0.0)
            rows = inputs.rows(slice(s, s + batch_size), device)
            rows.context, more = objective.text.validation_context(text_encoder, input_ids[s:s + batch_size], device)
            rows.conditions.update(more)
            terms = objective.diffusion.training_losses(objective.network(unet, rows), rows.latents, rows.timesteps,
                                                        rows.noise, loss_type=loss_type)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + weight * v.double().sum()
    keys = sorted(sums)
    totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return {f"val_{k}": float(v) / len(inputs) for k, v in zip(keys, totals)}


@contextlib.contextmanager
def eval_mode(*modules):
    """Run the body with ``modules`` in eval mode, then give each its training flag back."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


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
    """One row per prompt, one column per seed; each image from its own seeded generator. A stop signal ends it
    at the next row (`check_stop`)."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in tqdm(prompts, desc="sample grid", leave=False, disable=len(prompts) < 2):
        check_stop("drawing the sample grid")
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        images += pipe([prompt] * len(seeds), generator=gens, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale).images
    return make_grid(images, ncols=len(seeds))


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
    input_ids: torch.Tensor  # (V, L), or (V, k, L) for a family with k tokenizers
    captions: list[str]
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)


class Validator:
    """``validator(step) -> row``: the held-out loss at every call; from step 1 on also the sample grid
    (``samples/step-N.png``, TensorBoard) and, on built-in data, the built-in scores. With EMA on, the EMA weights
    are used."""

    def __init__(self, engine, stage, comp, objective, networks: tuple, data: ValidationSet, prompts: list[str]):
        """``stage``: the run's (it makes the pipeline and the grid); ``networks``: the unwrapped (U-Net, text
        encoder); ``prompts``: the grid's."""
        cfg, acc = engine.cfg, engine.accelerator
        self.engine, self.stage, self.comp, self.objective = engine, stage, comp, objective
        self.unet, self.text_encoder = networks
        self.data, self.prompts = data, prompts
        self.inputs = objective.validation_inputs(data.mean, data.std, cfg.train.seed, data.arrays)
        self.batch_size = micro_batch_size(cfg.train.batch_size, acc.num_processes,
                                           cfg.train.gradient_accumulation_steps)
        scored = stage.scored and cfg.data.dataset in SCORED_DATASETS and not cfg.dreambooth.instance_data
        self.score_dataset = cfg.data.dataset if scored else None  # whose built-in scorer reads the samples

    def __call__(self, step: int) -> dict:
        """Every process computes the loss on its share of the images; the main process draws the samples from
        whole modules (gathered from every process's shards under FSDP). The row on the main process, {} on the
        others."""
        engine, cfg, acc = self.engine, self.engine.cfg, self.engine.accelerator
        with engine.ema_weights(), acc.autocast():
            row = validation_loss(self.objective, self.unet, self.text_encoder, self.inputs, self.data.input_ids,
                                  self.batch_size, cfg.diffusion.loss_type, acc)
            if step > 0:
                with engine.whole(self.unet, self.text_encoder) as (unet, text_encoder):
                    if acc.is_main_process:
                        with eval_mode(unet, text_encoder):
                            row.update(self.samples(step, unet, text_encoder))
        return row if acc.is_main_process else {}

    def samples(self, step: int, unet, text_encoder) -> dict:
        """Write the sample grid of ``step`` drawn with (whole) ``unet`` and ``text_encoder``; the built-in scores
        of the samples when the data has a scorer."""
        engine, cfg = self.engine, self.engine.cfg
        s, tc = cfg.sample, cfg.train
        pipe = self.stage.pipeline(self.comp, unet, text_encoder,
                                   sampling_scheduler(self.comp.scheduler, s.scheduler))
        grid = self.stage.sample_grid(pipe, self.prompts, self.data, s)
        atomic_save(lambda p: grid.save(p, format="PNG"), engine.run_dir / "samples" / f"step-{step}.png")
        engine.metrics.image("samples", grid, step)
        if self.score_dataset is None or tc.score_num_images == 0:
            return {}
        return builtin_scores(pipe, self.score_dataset, tc.score_num_images, s.num_inference_steps, s.guidance_scale)
