"""Training of the text-conditional U-Net on cached VAE latents, under Accelerate.

    accelerate launch train_ldm.py --config configs/ldm/shapes.yaml [key=value ...]

``build_run`` reads top-down: the engine (accelerator, config check, seed), the run's stage and fine-tuning
method, data and networks, DreamBooth's class images, what the method trains, the caches and batch sources,
the objective and validator. ``train`` runs the engine's steps on it, has the method export what it made, and
closes the run. One step is
``forward_backward``: the step's global batch planned once, then each accumulation micro-batch's share of
this process through the objective.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace

import torch

from ldm.data.batches import CLASS_STREAMS, BatchSource, micro_batch_size, rank_slice
from ldm.data.cache import cached_posterior
from ldm.data.splits import Split, check_sizes, class_split
from ldm.diffusion.gaussian import GaussianDiffusion
from ldm.diffusion.schedulers import sampling_scheduler
from ldm.engine.cli import run
from ldm.engine.engine import Engine
from ldm.engine.errors import stoppable
from ldm.methods.base import ExportJob
from ldm.methods.metadata import training_metadata
from ldm.methods.registry import method_for
from ldm.models.components import Components, build_components
from ldm.models.text import report_truncated
from ldm.models.vae import is_pixel_space
from ldm.trainer.config import LDMConfig, check_config
from ldm.trainer.data import RunData, batch_source, data_source_for, posterior_cache
from ldm.trainer.optimizers import make_optimizer
from ldm.trainer.stage import TextToImage
from ldm.trainer.stages import stage_for
from ldm.trainer.validation import ValidationSet, Validator, check_latent_scale
from pipelines.fast import compile_model, set_channels_last
from pipelines.latents import latent_scale_shift

logger = logging.getLogger(__name__)


@stoppable
def train(cfg: LDMConfig) -> dict:
    started = time.time()
    run = build_run(cfg)
    engine, acc = run.engine, run.engine.accelerator
    step = engine.fit(run.sources[0], run.step, run.validate)
    saved = {}
    with engine.ema_weights(), engine.whole(run.unet, run.text_encoder) as (unet, text_encoder):
        if acc.is_main_process:  # once, from whole weights (gathered from every process under FSDP)
            metadata = training_metadata(cfg, run.comp, run.data.train, step, started)
            saved = method_for(cfg).export(ExportJob(cfg, run.stage, run.comp, unet, text_encoder, cfg.run_dir,
                                                     metadata, run.validate.prompts))
    vals = [r["val_loss"] for r in engine.metrics.rows() if "val_loss" in r]
    result = {"latent_std": round(run.latent_std, 3), "best_val_loss": round(min(vals), 5) if vals else None,
              **{k: v for k, v in engine.final_validation.items() if k.startswith("score_")}}
    data = run.data
    result.update(run.sources[0].summary())
    if data.unseen:
        result["images_never_seen"] = sum(data.unseen.values())
    if data.bad:
        result["bad_images_skipped"] = len(data.bad)
    if run.captions_truncated:
        result["captions_truncated"] = run.captions_truncated
    return engine.finish(result, {
        "validation set": "held-out" if data.heldout else "training images (no held-out split given)",
        "weights": "EMA" if engine.ema is not None else "trained", **saved,
        "samples": cfg.run_dir / "samples" / f"step-{step}.png",
        **({"buckets never trained on": data.unseen} if data.unseen else {}),
        **({"skipped images": data.bad_report} if data.bad_report else {})}, plot_keys=("loss", "mse", "val_loss"),
        modules=engine.trained_modules.values(), frozen=[*run.comp.text_encoders(), run.comp.vae])


@dataclass
class Run:
    """Everything ``train`` needs to run and export: the engine, the stage, the data, the step function and its
    batch sources, the validator, the prepared networks."""

    engine: Engine
    stage: TextToImage
    comp: Components
    data: RunData
    sources: list[BatchSource]
    step: object  # forward_backward(...)
    validate: Validator
    unet: torch.nn.Module  # prepared (wrapped under DDP)
    text_encoder: torch.nn.Module
    latent_std: float
    captions_truncated: int = 0  # captions longer than the text encoder's tokens (they lose their end)


def build_run(cfg: LDMConfig) -> Run:
    """Check the config, read the data, build the networks, draw DreamBooth's class images, let the method choose
    what trains, build the caches and batch sources, prepare for Accelerate, and make the objective, step and
    validator. The order is part of the run: every random draw of set-up comes from the seed, in this order."""
    engine = Engine(cfg, check_config, "training", cfg.train.validate_every)
    with engine.setting_up():  # a failure here leaves no run folder behind
        return _build_run(cfg, engine)


def _build_run(cfg: LDMConfig, engine: Engine) -> Run:
    acc, stage, method = engine.accelerator, stage_for(cfg), method_for(cfg)
    data_source = data_source_for(cfg)
    data = data_source.read(cfg, engine, method)
    comp = build_networks(cfg, engine, stage, data.train)
    db = cfg.dreambooth
    classes = draw_class_images(cfg, stage, comp, engine) if db.class_prompt or db.class_prompts else data.regularisation
    groups = method.trainable(cfg, comp)
    # Training never clips x̂_0 (improved-diffusion's losses do not); on pixels the bound's t = 0 term is the
    # discretized decoder of 8-bit images.
    diffusion = GaussianDiffusion.from_scheduler_config(comp.scheduler.config, clip_sample=False,
                                                        discrete_decoder=is_pixel_space(comp.vae))

    # Caches and batch sources; DreamBooth's prior preservation is a second source mixed into every step.
    sources = [data_source.batches(cfg, engine, stage, comp, data)]
    if classes is not None:
        sources.append(batch_source(cfg, engine, stage, comp, classes, CLASS_STREAMS, len(data.train.captions)))
    val = validation_set(cfg, engine, stage, comp, data.val, data.val_latents, data.val_arrays)
    latent_std = check_latent_scale(val.mean, val.std, *latent_scale_shift(comp.vae), warn=not is_pixel_space(comp.vae))
    captions = data.train.captions + (classes.captions if classes else [])
    # without a fixed set of captions (a stream's) the text encoder runs every step
    text_cfg = cfg if data_source.fixed_captions(cfg) else replace(cfg, data=replace(cfg.data, cache_text=False))
    text_inputs = stage.text_inputs(text_cfg, engine, comp, captions)
    truncated = report_truncated(comp.tokenizer, captions)  # counted for the summary too

    unet, text_encoders = prepare(cfg, engine, comp, groups)
    text_encoder = text_encoders[0]
    text = stage.text_context(text_inputs, comp, text_encoders)
    objective = stage.objective(comp, diffusion, text, acc.gather)
    if objective.timesteps.checkpointed:  # its loss history decides the next timesteps: resume needs it
        engine.state_objects["timestep_importance"] = objective.timesteps
    validate = Validator(engine, stage, comp, objective, (acc.unwrap_model(unet), acc.unwrap_model(text_encoder)),
                         val, cfg.sample.prompts or sorted(set(data.train.captions))[:8])
    unet.train()
    for encoder in text_encoders:
        encoder.train(comp.train_text_encoder)
    step = forward_backward(engine, objective, sources, unet, text_encoders, comp.train_text_encoder)
    return Run(engine=engine, stage=stage, comp=comp, data=data, sources=sources, step=step, validate=validate,
               unet=unet, text_encoder=text_encoder, latent_std=latent_std, captions_truncated=truncated)


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------

def build_networks(cfg: LDMConfig, engine, stage: TextToImage, train_split: Split) -> Components:
    """The run's networks (`build_components`), the frozen VAE on the device; a tokenizer learned from the
    captions is kept in every checkpoint."""
    comp = build_components(cfg, train_split.captions, engine.accelerator, engine.resume_from, stage)
    if not cfg.model.pretrained:  # the tokenizer learned from the captions is part of the run's state
        engine.checkpoint_files["tokenizer"] = cfg.run_dir / "tokenizer"
    check_sizes(cfg, train_split, stage.size_multiple(comp.vae))
    comp.vae.requires_grad_(False).eval().to(engine.device)
    return comp


def draw_class_images(cfg: LDMConfig, stage: TextToImage, comp: Components, engine) -> Split:
    """DreamBooth's prior preservation: images of the class drawn once by the base model, as a split."""
    from ldm.methods.dreambooth import ensure_class_images

    db, device = cfg.dreambooth, engine.device

    def base_pipeline():
        for encoder in comp.text_encoders():  # every text side the stage's pipeline encodes with
            encoder.to(device).eval()
        return stage.pipeline(comp, comp.unet.to(device).eval(), comp.text_encoder,
                              sampling_scheduler(comp.base_scheduler, "ddpm"))

    prompts = db.class_prompts or [db.class_prompt]
    folder = ensure_class_images(base_pipeline, db.class_data or cfg.run_dir / "class_images", prompts,
                                 db.num_class_images, seed=cfg.train.seed,
                                 num_inference_steps=db.class_inference_steps,
                                 guidance_scale=db.class_guidance_scale, accelerator=engine.accelerator)
    comp.unet.train()
    with engine.accelerator.main_process_first():
        return class_split(cfg, folder, prompts)


def validation_set(cfg: LDMConfig, engine, stage: TextToImage, comp: Components, split: Split,
                   latents: tuple | None = None, arrays: dict | None = None) -> ValidationSet:
    """The validation images' posteriors (V, C, h, w), from their cache (or ``latents``, precomputed), their first
    captions, and the stage's arrays of them (or those of ``arrays`` the stage streams, precomputed). The std is zero
    when training uses the posterior mean, so the validation loss and the latent scale check see what training
    sees."""
    every = list(range(len(split)))
    mean, std = latents if latents is not None else cached_posterior(
        posterior_cache(cfg, engine, comp, split, flips=False), every, torch.zeros(len(split), dtype=torch.bool))
    if cfg.diffusion.latent_posterior == "mean":
        std = torch.zeros_like(std)
    captions = split.first_captions()
    if arrays is not None:
        arrays = {name: a for name, a in arrays.items() if name in stage.stream_arrays()}
    return ValidationSet(mean, std, stage.tokenize(comp, captions), captions,
                         arrays if arrays is not None else stage.validation_arrays(engine, split))


def prepare(cfg: LDMConfig, engine, comp: Components, groups: list[dict]):
    """Gradient checkpointing and compilation, the optimizer, ``accelerator.prepare``, the engine's optimizer
    settings and the EMA of what trains in the U-Net; returns the prepared U-Net and text encoders (the first
    one's first)."""
    tc, acc, unet, encoders = cfg.train, engine.accelerator, comp.unet, comp.text_encoders()
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for text_encoder in encoders if comp.train_text_encoder else []:  # transformers 5 renamed the method
            (getattr(text_encoder, "activation_checkpointing_enable", None)
             or text_encoder.gradient_checkpointing_enable)()
    how, channels_last = fast_path(tc, engine.device)
    if channels_last:
        set_channels_last(unet, True)
    trained = {"unet": unet, **{name: e for name, e in zip(("text_encoder", "text_encoder_2"), encoders)
                                if any(p.requires_grad for p in e.parameters())}}
    if engine.sharding is not None:
        groups = shard(engine, groups, {k: m for k, m in trained.items() if k == "unet" or comp.train_text_encoder})
    if how:  # in place: parameter names, checkpoints and exports are unchanged
        compile_model(unet, how)
    optimizer = make_optimizer(groups, tc, engine.device)
    if engine.sharding is not None:  # sharded modules are not Accelerate's to wrap (on CPUs it would add DDP)
        for text_encoder in encoders:
            text_encoder.to(engine.device)
    elif comp.train_text_encoder:
        unet, *encoders, optimizer = acc.prepare(unet, *encoders, optimizer)
    else:  # a frozen encoder has no gradients for DDP to synchronise: it is only moved
        unet, optimizer = acc.prepare(unet, optimizer)
        for text_encoder in encoders:
            text_encoder.to(engine.device)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    engine.optimize_with(optimizer, trainable, tc.max_grad_norm, tc.lr_schedule, tc.warmup_steps, modules=trained)
    engine.track_ema([p for p in acc.unwrap_model(unet).parameters() if p.requires_grad], tc.ema_decay, tc.ema_warmup)
    return unet, encoders


def shard(engine, groups: list[dict], modules: dict) -> list[dict]:
    """Shard ``modules`` ({name: module}) with FSDP2, each block its own unit (`shard_blocks`); returns the
    parameter groups pointed at the sharded parameters."""
    before = {id(p): f"{name}.{n}" for name, m in modules.items() for n, p in m.named_parameters()}
    outside = [p for g in groups for p in g["params"] if id(p) not in before]
    if outside:  # nothing would average their gradients across processes
        raise ValueError(f"FSDP shards {sorted(modules)}, but this run also trains {len(outside)} tensor(s) outside "
                         f"them (textual inversion's embedding rows); train it with DDP (configs/accelerate/ddp.yaml)")
    if "text_encoder_2" in modules:  # its sample grids and export read the second encoder from the components
        raise ValueError("model.train_text_encoder=true on a model with two text encoders (SDXL) is not supported "
                         "under FSDP; shard the U-Net alone (model.train_text_encoder=false) or use DDP")
    for module in modules.values():
        engine.sharding.shard(module, shard_blocks(module))
    return engine.sharding.remap(groups, before, modules)


def shard_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The units a module is sharded in, innermost first: a U-Net's transformers (each gathered alone: one of SDXL's
    holds up to 0.35 B parameters), then its down, middle and up blocks (their ResNets and resamplers); a CLIP text
    encoder's layers. Compiled regions (`pipelines.fast.REGIONS`) lie inside the units."""
    if hasattr(module, "down_blocks"):
        transformers = [m for m in module.modules() if type(m).__name__ == "Transformer2DModel"]
        blocks = [*module.down_blocks, *([module.mid_block] if module.mid_block is not None else []), *module.up_blocks]
        return transformers + blocks
    layers = [m for name, m in module.named_modules() if name.endswith("encoder.layers")]
    if layers:
        return list(layers[0])
    raise ValueError(f"cannot shard a {type(module).__name__}: no U-Net blocks or text encoder layers found")


def fast_path(tc, device: torch.device) -> tuple[str | None, bool]:
    """(how to compile the U-Net or None, channels-last or not) for ``train.compile`` / ``train.channels_last``."""
    cuda = device.type == "cuda"
    how = {"auto": "regional" if cuda else None, True: "full", False: None}.get(tc.compile, tc.compile)
    return how, cuda if tc.channels_last == "auto" else tc.channels_last


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------

def forward_backward(engine, objective, sources: list[BatchSource], unet, text_encoders: list,
                     train_text_encoder: bool):
    """The step function: ``step(step, batch) -> {term: mean over the step}``. Gradients of every micro-batch
    add up (each loss divided by the number of micro-batches) and are all-reduced once, on the last."""
    acc = engine.accelerator
    accum = engine.cfg.train.gradient_accumulation_steps
    per_process = micro_batch_size(engine.cfg.train.batch_size, acc.num_processes, accum)
    synced = [unet, *text_encoders] if train_text_encoder else [unet]

    def step(step: int, batch: list[int]) -> dict:
        plans = [sources[0].plan(step, batch)] + [s.plan(step) for s in sources[1:]]
        draws = [objective.draw(plan) for plan in plans]
        sums: dict = {}
        for k in range(accum):
            sl = rank_slice(k, acc.process_index, acc.num_processes, per_process)
            with contextlib.ExitStack() as no_sync:
                if k < accum - 1:
                    for model in synced:
                        no_sync.enter_context(engine.no_sync(model))
                with acc.autocast():
                    parts = [(s.load(p, sl), d, sl) for s, p, d in zip(sources, plans, draws)]
                    terms, loss = objective(unet, parts, engine.device)
                acc.backward(loss / accum)
            for key, v in terms.items():
                sums[key] = sums.get(key, 0.0) + v.detach().mean() / accum
        return sums

    return step


def main(argv=None) -> None:
    """``train_ldm.py``'s command line: ``--config PRESET.yaml`` and ``key=value`` overrides (the numbers go to
    the summary and ``metrics.jsonl``; a console script's exit status stays 0)."""
    run(LDMConfig, train, "Train a text-to-image latent diffusion model.", argv)


if __name__ == "__main__":
    main()
