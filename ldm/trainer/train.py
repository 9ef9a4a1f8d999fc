"""Training of the text-conditional U-Net on cached VAE latents, under Accelerate.

    accelerate launch train_ldm.py --config configs/ldm/shapes.yaml [key=value ...]

``build_run`` reads top-down: the engine (accelerator, config check, seed), data and networks, DreamBooth's
class images, what trains (all weights or LoRA adapters), the caches and batch sources, the objective and
validator. ``train`` runs the engine's steps on it, exports and closes the run. One step is
``forward_backward``: the step's global batch planned once, then each accumulation micro-batch's share of
this process through the objective.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.fast import compile_model, set_channels_last

from ldm.data.batches import CLASS_STREAMS, TRAIN_STREAMS, BatchSource, CachedArrays, CutArrays, PixelItems, rank_slice
from ldm.eval.scorers import SCORED_DATASETS
from ldm.data.cache import cached_posterior, latent_cache, text_cache
from ldm.trainer.config import LDMConfig, check_config
from ldm.data.batches import GlobalBatchSampler
from ldm.diffusion.gaussian import GaussianDiffusion
from ldm.engine.cli import run
from ldm.engine.engine import Engine
from ldm.trainer.export import export
from ldm.models.components import Components, build_components, make_pipeline
from ldm.trainer.objective import LatentDiffusionObjective, TextContext
from ldm.trainer.superres import SuperResolutionObjective, low_res_cache
from ldm.data.splits import Split, check_sizes, class_split, load_splits, report_bad_images, report_unseen
from ldm.models.text import tokenize
from ldm.trainer.validation import ValidationSet, Validator, check_latent_scale
from ldm.models.vae import encode, encoder_fingerprint, is_pixel_space, latent_scale_shift
from pipelines import vae_scale_factor

logger = logging.getLogger(__name__)


def train(cfg: LDMConfig) -> dict:
    run = build_run(cfg)
    engine, acc = run.engine, run.engine.accelerator
    step = engine.fit(run.sources[0], run.step, run.validate)
    saved = {}
    if acc.is_main_process:
        with engine.ema_weights():
            saved = export(cfg, run.comp, acc.unwrap_model(run.unet), acc.unwrap_model(run.text_encoder), cfg.run_dir)
    vals = [r["val_loss"] for r in engine.metrics.rows() if "val_loss" in r]
    result = {"latent_std": round(run.latent_std, 3), "best_val_loss": round(min(vals), 5) if vals else None,
              **{k: v for k, v in engine.final_validation.items() if k.startswith("score_")}}
    if run.unseen:
        result["images_never_seen"] = sum(run.unseen.values())
    if run.bad_images:
        result["bad_images_skipped"] = len(run.bad_images)
    return engine.finish(result, {
        "validation set": "held-out" if run.heldout else "training images (no held-out split given)",
        "weights": "EMA" if engine.ema is not None else "trained", **saved,
        "samples": cfg.run_dir / "samples" / f"step-{step}.png",
        **({"buckets never trained on": run.unseen} if run.unseen else {}),
        **({"skipped images": run.bad_report} if run.bad_report else {})}, plot_keys=("loss", "mse", "val_loss"))


@dataclass
class Run:
    """Everything ``train`` needs to run and export: the engine, the step function and its batch sources, the
    validator, the prepared networks."""

    engine: Engine
    comp: Components
    sources: list[BatchSource]
    step: object  # forward_backward(...)
    validate: Validator
    unet: torch.nn.Module  # prepared (wrapped under DDP)
    text_encoder: torch.nn.Module
    heldout: bool
    latent_std: float
    unseen: dict
    bad_images: list  # skipped: they cannot be decoded
    bad_report: Path | None  # the file naming them


def build_run(cfg: LDMConfig) -> Run:
    """Check the config, read the data, build the networks, draw DreamBooth's class images, choose what trains,
    build the caches and batch sources, prepare for Accelerate, and make the objective, step and validator."""
    engine = Engine(cfg, check_config, "training", cfg.train.validate_every)
    acc, tc = engine.accelerator, cfg.train
    with acc.main_process_first():  # built-in data is generated once, by the main process
        train_split, val_split, heldout = load_splits(cfg)
    if cfg.finetune.method == "textual_inversion":
        from ldm.methods.textual_inversion import check_captions

        check_captions(train_split.captions, cfg.finetune.placeholder_token)
    bad_report = report_bad_images(train_split.bad + val_split.bad, cfg.run_dir, acc.is_main_process)
    comp = build_components(cfg, train_split.captions, acc, engine.resume_from)
    if not cfg.model.pretrained:  # the tokenizer learned from the captions is part of the run's state
        engine.checkpoint_files["tokenizer"] = cfg.run_dir / "tokenizer"
    # sizes map to whole latents, and for a super-resolution stage to whole low-resolution pixels
    check_sizes(cfg, train_split, max(vae_scale_factor(comp.vae), comp.upscale_factor or 1))
    comp.vae.requires_grad_(False).eval().to(engine.device)
    db = cfg.dreambooth
    classes = draw_class_images(cfg, comp, engine) if db.class_prompt or db.class_prompts else None
    groups = choose_trainable(cfg, comp)
    # Training never clips x̂_0 (improved-diffusion's losses do not); on pixels the bound's t = 0 term is the
    # discretized decoder of 8-bit images.
    diffusion = GaussianDiffusion.from_scheduler_config(comp.scheduler.config, clip_sample=False,
                                                        discrete_decoder=is_pixel_space(comp.vae))

    # Caches and batch sources; DreamBooth's prior preservation is a second source mixed into every step.
    input_ids = tokenize(comp.tokenizer, train_split.captions + (classes.captions if classes else []))  # (N, L)
    sources = [batch_source(cfg, engine, comp, train_split, TRAIN_STREAMS, masked=cfg.data.mask_source != "none")]
    if classes is not None:
        sources.append(batch_source(cfg, engine, comp, classes, CLASS_STREAMS, len(train_split.captions)))
    val = validation_set(cfg, engine, comp, val_split)
    latent_std = check_latent_scale(val.mean, val.std, *latent_scale_shift(comp.vae), warn=not is_pixel_space(comp.vae))
    empty_ids = tokenize(comp.tokenizer, [""])[0]
    text = text_cache(comp.text_encoder, input_ids, empty_ids, cfg.data.cache_dir, acc) \
        if cfg.data.cache_text and not comp.train_text_encoder else None

    # Prepare; the engine steps the optimizer and the EMA, which averages what trains in the U-Net.
    unet, text_encoder = prepare(cfg, engine, comp, groups)
    unet_u, te_u = acc.unwrap_model(unet), acc.unwrap_model(text_encoder)
    engine.track_ema([p for p in unet_u.parameters() if p.requires_grad], tc.ema_decay, tc.ema_warmup)
    objective = make_objective(cfg, comp, diffusion, TextContext(
        input_ids, empty_ids, encoder=text_encoder if text is None else None, cache=text), acc.gather)
    if objective.timesteps.checkpointed:  # its loss history decides the next timesteps: resume needs it
        engine.state_objects["timestep_importance"] = objective.timesteps
    score_on = cfg.data.dataset if cfg.data.dataset in SCORED_DATASETS and not db.instance_data else None
    if comp.upscale_factor:  # scored by `demos.cascade_demo` at the end, on a base model's samples
        score_on = None
    validate = Validator(engine, comp, objective, unet_u, te_u, val,
                         cfg.sample.prompts or sorted(set(train_split.captions))[:8], score_on,
                         micro_batch_size(cfg, acc.num_processes))
    unet.train()
    text_encoder.train(comp.train_text_encoder)
    step = forward_backward(engine, objective, sources, unet, text_encoder, comp.train_text_encoder)
    return Run(engine, comp, sources, step, validate, unet, text_encoder, heldout, latent_std,
               report_unseen(train_split, tc.batch_size), train_split.bad + val_split.bad, bad_report)


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------

def draw_class_images(cfg: LDMConfig, comp: Components, engine) -> Split:
    """DreamBooth's prior preservation: images of the class drawn once by the base model, as a split."""
    from ldm.methods.dreambooth import ensure_class_images

    db, device = cfg.dreambooth, engine.device

    def base_pipeline():
        return make_pipeline(comp, comp.unet.to(device).eval(), comp.text_encoder.to(device).eval(), "ddpm",
                             base=True)

    prompts = db.class_prompts or [db.class_prompt]
    folder = ensure_class_images(base_pipeline, db.class_data or cfg.run_dir / "class_images", prompts,
                                 db.num_class_images, cfg.train.seed, db.class_inference_steps,
                                 db.class_guidance_scale, engine.accelerator)
    comp.unet.train()
    with engine.accelerator.main_process_first():
        return class_split(cfg, folder, prompts)


def choose_trainable(cfg: LDMConfig, comp: Components) -> list[dict]:
    """Parameter groups to optimise: LoRA adapters only (the base frozen, maybe in bf16/fp16), a textual
    inversion's new embeddings only, or the whole U-Net and, when it trains, the text encoder at its own
    learning rate."""
    tc = cfg.train
    if cfg.finetune.method == "textual_inversion":
        from ldm.methods.textual_inversion import add_placeholder

        comp.train_text_encoder = True  # its embedding table trains: encoded every step, synchronised under DDP
        comp.unet.requires_grad_(False)
        return [{"params": add_placeholder(comp.tokenizer, comp.text_encoder, cfg.finetune), "lr": tc.learning_rate,
                 "weight_decay": 0.0}]  # decay would move the frozen rows
    if cfg.finetune.method == "lora":
        from ldm.methods.lora import add_lora

        comp.train_text_encoder = cfg.finetune.lora_text_encoder
        return [{"params": add_lora(comp.unet, comp.text_encoder, cfg.finetune), "lr": tc.learning_rate}]
    comp.text_encoder.requires_grad_(comp.train_text_encoder)
    groups = [{"params": list(comp.unet.parameters()), "lr": tc.learning_rate}]
    if comp.train_text_encoder:
        groups.append({"params": list(comp.text_encoder.parameters()),
                       "lr": tc.text_encoder_learning_rate or tc.learning_rate})
    return groups


def posterior_cache(cfg: LDMConfig, engine, comp: Components, split: Split, flips: bool) -> dict:
    """The VAE posterior cache of ``split`` (``flips``: both orientations)."""
    vae = comp.vae
    return latent_cache(lambda pixels: encode(vae, pixels), encoder_fingerprint(vae), split,
                        pixel_items(cfg, split, random_crop=False), vae.config.latent_channels, vae_scale_factor(vae),
                        cfg.data.cache_dir, engine.accelerator, flips, cfg.train.num_workers)


def validation_set(cfg: LDMConfig, engine, comp: Components, split: Split) -> ValidationSet:
    """The validation images' posteriors (V, C, h, w), from their cache, their first captions, and (a
    super-resolution stage) their low-resolution versions. The std is zero when training uses the posterior
    mean, so the validation loss and the latent scale check see what training sees."""
    every = list(range(len(split)))
    mean, std = cached_posterior(posterior_cache(cfg, engine, comp, split, flips=False), every,
                                 torch.zeros(len(split), dtype=torch.bool))
    if cfg.diffusion.latent_posterior == "mean":
        std = torch.zeros_like(std)
    captions = split.first_captions()
    arrays = {"low_res": low_res_images(cfg, engine, comp, split)} if comp.upscale_factor else {}
    return ValidationSet(mean, std, tokenize(comp.tokenizer, captions), captions, arrays)


def low_res_images(cfg: LDMConfig, engine, comp: Components, split: Split) -> torch.Tensor:
    """The low-resolution versions (V, 3, h, w) in [-1, 1] of a super-resolution stage's validation images."""
    cache = low_res_cache(pixel_items(cfg, split, random_crop=False), split, comp.upscale_factor, cfg.data.cache_dir,
                          engine.accelerator, flips=False, num_workers=cfg.train.num_workers)
    return cached_posterior(cache, list(range(len(split))), torch.zeros(len(split), dtype=torch.bool))[0]


def pixel_items(cfg: LDMConfig, split: Split, random_crop: bool) -> PixelItems:
    d = cfg.data
    return PixelItems(split, d.resolution, d.image_column, d.center_crop, random_crop, d.alpha_background)


def batch_source(cfg: LDMConfig, engine, comp: Components, split: Split, streams, caption_offset: int = 0,
                 masked: bool = False):
    """The split's batches, read from its latent cache or, when each step crops anew, as pixels; with the
    masked loss's masks when ``masked``."""
    d = cfg.data
    sampler = GlobalBatchSampler(split.groups, len(split), cfg.train.batch_size, cfg.train.seed, drop_last=True)
    cached = d.cache_latents and not d.random_crop
    extras = {"mask": mask_arrays(cfg, engine, comp, split, cached)} if masked else {}
    if cached:
        if comp.upscale_factor:  # a super-resolution stage's conditioning images, stored beside the latents
            extras["low_res"] = CachedArrays(low_res_cache(pixel_items(cfg, split, random_crop=False), split,
                                                           comp.upscale_factor, d.cache_dir, engine.accelerator,
                                                           d.random_flip, cfg.train.num_workers))
        return BatchSource(split, sampler, cfg.train.seed, streams, d.random_flip,
                           latents=posterior_cache(cfg, engine, comp, split, d.random_flip),
                           caption_offset=caption_offset, extras=extras)
    if d.cache_latents:
        logger.info("data.random_crop=true: each step crops anew, so images are encoded every step (no latent cache)")
    return BatchSource(split, sampler, cfg.train.seed, streams, d.random_flip,
                       pixels=pixel_items(cfg, split, d.random_crop), caption_offset=caption_offset, extras=extras)


def mask_arrays(cfg: LDMConfig, engine, comp: Components, split: Split, cached: bool):
    """The masked loss's masks: cached at latent size beside cached latents, else cut each step as the pixels."""
    from ldm.data.masks import MaskItems, mask_cache

    d = cfg.data
    masks = MaskItems(split, d.resolution, d.image_column, d.center_crop, d.random_crop and not cached,
                      d.mask_source, d.mask_column)
    if not cached:
        return CutArrays(masks)
    return CachedArrays(mask_cache(masks, split, vae_scale_factor(comp.vae), d.cache_dir, engine.accelerator,
                                   d.random_flip, cfg.train.num_workers))


def prepare(cfg: LDMConfig, engine, comp: Components, groups: list[dict]):
    """Gradient checkpointing and compilation, the optimizer, ``accelerator.prepare``, and the engine's
    optimizer settings; returns the prepared U-Net and text encoder."""
    tc, acc, unet, text_encoder = cfg.train, engine.accelerator, comp.unet, comp.text_encoder
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if comp.train_text_encoder:  # transformers 5 renamed the method
            (getattr(text_encoder, "activation_checkpointing_enable", None)
             or text_encoder.gradient_checkpointing_enable)()
    how, channels_last = fast_path(tc, engine.device)
    if channels_last:
        set_channels_last(unet, True)
    if how:  # in place: parameter names, checkpoints and exports are unchanged
        compile_model(unet, how)
    optimizer = make_optimizer(groups, tc, engine.device)
    if comp.train_text_encoder:
        unet, text_encoder, optimizer = acc.prepare(unet, text_encoder, optimizer)
    else:  # a frozen encoder has no gradients for DDP to synchronise: it is only moved
        unet, optimizer = acc.prepare(unet, optimizer)
        text_encoder.to(engine.device)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    engine.optimize_with(optimizer, trainable, tc.max_grad_norm, tc.lr_schedule, tc.warmup_steps)
    return unet, text_encoder


def fast_path(tc, device: torch.device) -> tuple[str | None, bool]:
    """(how to compile the U-Net or None, channels-last or not) for ``train.compile`` / ``train.channels_last``."""
    cuda = device.type == "cuda"
    how = {"auto": "regional" if cuda else None, True: "full", False: None}.get(tc.compile, tc.compile)
    return how, cuda if tc.channels_last == "auto" else tc.channels_last


def make_optimizer(params: list[dict], tc, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"betas": (tc.adam_beta1, tc.adam_beta2), "weight_decay": tc.weight_decay}
    if tc.optimizer == "adamw":
        # Fused on CUDA and on CPU (one kernel over all tensors: a training step of the shapes preset takes
        # 0.51 s instead of 0.60 s on 2 cores); it matches the unfused update to float32 rounding.
        return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu") or None, **kwargs)
    try:  # adamw8bit (the config admits no other name)
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                          "use train.optimizer=adamw without it") from e
    return bnb.optim.AdamW8bit(params, **kwargs)


def make_objective(cfg: LDMConfig, comp: Components, diffusion, text: TextContext, gather):
    """Latent (or pixel) diffusion under text context, or a super-resolution stage's objective."""
    if comp.upscale_factor:
        sr = cfg.super_resolution
        return SuperResolutionObjective(diffusion, cfg.diffusion, cfg.data.caption_dropout, text, comp.vae,
                                        gather=gather, factor=comp.upscale_factor, noise_levels=sr.noise_levels,
                                        blur_sigma=sr.blur_sigma, crop=sr.train_crop)
    return LatentDiffusionObjective(diffusion, cfg.diffusion, cfg.data.caption_dropout, text, comp.vae,
                                    cfg.dreambooth.prior_loss_weight, gather=gather, mask_floor=cfg.data.mask_floor)


def micro_batch_size(cfg: LDMConfig, num_processes: int) -> int:
    """Images per process per forward."""
    return cfg.train.batch_size // (num_processes * cfg.train.gradient_accumulation_steps)


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------

def forward_backward(engine, objective, sources: list[BatchSource], unet, text_encoder, train_text_encoder: bool):
    """The step function: ``step(step, batch) -> {term: mean over the step}``. Gradients of every micro-batch
    add up (each loss divided by the number of micro-batches) and are all-reduced once, on the last."""
    acc = engine.accelerator
    accum = engine.cfg.train.gradient_accumulation_steps
    per_process = micro_batch_size(engine.cfg, acc.num_processes)
    synced = [unet, text_encoder] if train_text_encoder else [unet]

    def step(step: int, batch: list[int]) -> dict:
        plans = [sources[0].plan(step, batch)] + [s.plan(step) for s in sources[1:]]
        draws = [objective.draw(plan) for plan in plans]
        sums: dict = {}
        for k in range(accum):
            sl = rank_slice(k, acc.process_index, acc.num_processes, per_process)
            with contextlib.ExitStack() as no_sync:
                if k < accum - 1:
                    for model in synced:
                        no_sync.enter_context(acc.no_sync(model))
                with acc.autocast():
                    parts = [(s.load(p, sl), d, sl) for s, p, d in zip(sources, plans, draws)]
                    terms, loss = objective(unet, parts, engine.device)
                acc.backward(loss / accum)
            for key, v in terms.items():
                sums[key] = sums.get(key, 0.0) + v.detach().mean() / accum
        return sums

    return step


def train_main(argv=None):
    from ldm.trainer.config import LDMConfig

    return run(LDMConfig, train, "Train a text-to-image latent diffusion model.", argv)
