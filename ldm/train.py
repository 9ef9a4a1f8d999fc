"""Training of the text-conditional U-Net on cached VAE latents, under Accelerate.

    accelerate launch train_ldm.py --config configs/ldm/shapes.yaml [key=value ...]

Reads top-down: build components, cache latents, prepare, then steps (log, sample), then export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import LDMConfig, save_config
from .data import ImageCaptionDataset, load_image_caption_dataset, resolve_data_dir
from .diffusion import GaussianDiffusion
from .run import (MetricsWriter, atomic_save, atomic_save_dir, format_summary, make_accelerator, make_grid,
                  plot_curves, warn_if_cpu_threads_capped)
from .text import build_text_encoder, build_tokenizer, tokenize

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# 1. Components
# ----------------------------------------------------------------------------------------------

def make_noise_scheduler(cfg: LDMConfig) -> DDPMScheduler:
    """The training schedule as a diffusers scheduler: it is saved with the pipeline and the
    diffusion math is built from its config, so both always agree."""
    d = cfg.diffusion
    return DDPMScheduler(
        num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule, beta_start=d.beta_start,
        beta_end=d.beta_end, prediction_type=d.prediction_type, rescale_betas_zero_snr=d.rescale_betas_zero_snr,
        variance_type="learned_range" if d.learned_variance else "fixed_small",
        clip_sample=False,  # latents are not bounded like pixels
        timestep_spacing="trailing",  # sampling starts at t = T-1 (Lin et al. 2024)
        steps_offset=1,  # what StableDiffusionPipeline expects (it rewrites other values on load)
    )


def build_components(cfg: LDMConfig, captions: list[str]) -> dict:
    """Tokenizer, text encoder, VAE, U-Net and noise scheduler for a run."""
    from autoencoder.pretrained import load_vae
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler = make_noise_scheduler(cfg)
    if cfg.model.pretrained:
        root = Path(cfg.model.pretrained)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"model.pretrained={str(root)!r} is not a diffusers pipeline folder "
                                    f"(no model_index.json)")
        from diffusers import AutoencoderKL

        # The model was trained on its own noise schedule and prediction type: keep them.
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(root / "scheduler"), clip_sample=False)
        logger.info("fine-tuning %s: noise schedule and prediction type (%s) come from its scheduler; "
                    "diffusion.* schedule settings are ignored", root, scheduler.config.prediction_type)

        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
        train_text_encoder = False  # a pretrained encoder stays frozen
    else:
        tc = cfg.model.text_encoder
        tokenizer = build_tokenizer(captions, vocab_size=tc.vocab_size, max_length=tc.max_length)
        text_encoder = build_text_encoder(tokenizer, tc.hidden_size, tc.num_hidden_layers,
                                          tc.num_attention_heads, tc.intermediate_size)
        vae = load_vae(cfg.model.vae)
        unet = build_unet(cfg, vae, text_encoder.config.hidden_size)
        train_text_encoder = cfg.model.train_text_encoder
    expected_out = vae.config.latent_channels * (2 if cfg.diffusion.learned_variance else 1)
    if unet.config.out_channels != expected_out:
        raise ValueError(f"the U-Net has {unet.config.out_channels} output channels but diffusion.learned_variance="
                         f"{cfg.diffusion.learned_variance} needs {expected_out}")
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "scheduler": scheduler, "train_text_encoder": train_text_encoder}


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_unet(cfg: LDMConfig, vae, cross_attention_dim: int) -> UNet2DConditionModel:
    u = cfg.model.unet
    f = vae_scale_factor(vae)
    if cfg.data.resolution % f:
        raise ValueError(f"data.resolution={cfg.data.resolution} must be a multiple of the VAE's factor {f}")
    latent = vae.config.latent_channels
    return UNet2DConditionModel(
        sample_size=cfg.data.resolution // f, in_channels=latent,
        out_channels=latent * (2 if cfg.diffusion.learned_variance else 1),
        block_out_channels=list(u.block_out_channels), layers_per_block=u.layers_per_block,
        down_block_types=list(u.down_block_types), up_block_types=list(u.up_block_types),
        cross_attention_dim=cross_attention_dim, attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )


# ----------------------------------------------------------------------------------------------
# 2. Latent cache: the VAE posterior (mean, std) of every image, computed once per dataset
# ----------------------------------------------------------------------------------------------

def _fingerprint(vae, data_dir: Path, cfg: LDMConfig) -> str:
    """Changes whenever the VAE weights, the image transform or the data change."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    h.update(json.dumps([cfg.data.resolution, cfg.data.center_crop, cfg.data.image_column]).encode())
    for path in sorted(data_dir.rglob("*")):
        if path.is_file():
            stat = path.stat()
            h.update(f"{path.relative_to(data_dir)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def cache_latents(vae, dataset: ImageCaptionDataset, path: Path, accelerator: Accelerator,
                  batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Encode every image once (main process) into ``path``; every process then loads it."""
    if accelerator.is_main_process and not path.is_file():
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        vae = vae.to(accelerator.device)
        means, stds = [], []
        for batch in tqdm(loader, desc="caching latents", disable=not accelerator.is_local_main_process):
            dist = vae.encode(batch["pixel_values"].to(accelerator.device, vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        tensors = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
        atomic_save(lambda p: save_file(tensors, p), path)
    accelerator.wait_for_everyone()
    return load_file(path)


def check_latent_scale(latents: dict, scale: float, shift: float, tolerance: float = 0.25) -> float:
    """Std of scaled posterior samples; warns when far from 1 (a ``scaling_factor`` unfit for this data)."""
    g = torch.Generator().manual_seed(0)
    z0 = (latents["mean"] + latents["std"] * torch.randn(latents["mean"].shape, generator=g) - shift) * scale
    std = float(z0.std())
    if abs(std - 1.0) > tolerance:
        logger.warning("scaled latents have std %.3f, not ~1: the VAE's scaling_factor does not fit this data",
                       std)
    return std


# ----------------------------------------------------------------------------------------------
# 3. Sampling during and after training
# ----------------------------------------------------------------------------------------------

def make_pipeline(components: dict, unet, text_encoder, scheduler_name: str = "ddpm"):
    from pipelines import LDMPipeline

    return LDMPipeline(vae=components["vae"], text_encoder=text_encoder, tokenizer=components["tokenizer"],
                       unet=unet, scheduler=sampling_scheduler(components["scheduler"], scheduler_name))


def sampling_scheduler(train_scheduler: DDPMScheduler, name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddpm":
        return DDPMScheduler.from_config(train_scheduler.config)
    if name == "ddim":
        return DDIMScheduler.from_config(train_scheduler.config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(train_scheduler.config)
    raise ValueError(f"sample.scheduler={name!r} is not one of 'ddpm', 'ddim', 'dpm++'")


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


def batch_loss(diffusion: GaussianDiffusion, unet, text_encoder, batch, empty_ids: torch.Tensor, scale: float,
               shift: float, gen: torch.Generator, cfg: LDMConfig) -> dict:
    """Loss terms for one batch of cached posteriors (mean, std) and token ids (B, L)."""
    mean, std, ids = batch  # (B, C, h, w), (B, C, h, w), (B, L)
    b, device = mean.shape[0], mean.device
    # z0 ~ q(z | x): a fresh draw from the cached posterior each step, then scaled to unit variance.
    z0 = (mean + std * torch.randn(mean.shape, generator=gen, device=device) - shift) * scale
    noise = torch.randn(mean.shape, generator=gen, device=device)
    t = torch.randint(0, diffusion.num_timesteps, (b,), generator=gen, device=device)
    # Classifier-free guidance: the empty caption with probability caption_dropout.
    drop = torch.rand(b, generator=gen, device=device) < cfg.data.caption_dropout
    context = text_encoder(torch.where(drop[:, None], empty_ids, ids))[0]  # (B, L, D)

    def model(x, tt):
        return unet(x, tt, encoder_hidden_states=context).sample

    return diffusion.training_losses(model, z0, t, noise, snr_gamma=cfg.diffusion.snr_gamma,
                                     vlb_weight=cfg.diffusion.vlb_weight)


@torch.no_grad()
def validation_loss(diffusion: GaussianDiffusion, unet, text_encoder, latents: dict, input_ids: torch.Tensor,
                    scale: float, shift: float, num: int = 64, seed: int = 0) -> dict:
    """Unweighted loss terms on fixed images, timesteps (spread over [0, T)) and noise, so that values
    from different steps of a run are comparable."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(input_ids), generator=g)[:num]
    device = next(unet.parameters()).device
    mean, std = latents["mean"][idx], latents["std"][idx]
    z0 = ((mean + std * torch.randn(mean.shape, generator=g) - shift) * scale).to(device)
    noise = torch.randn(z0.shape, generator=g).to(device)
    t = torch.linspace(0, diffusion.num_timesteps - 1, len(idx)).round().long().to(device)
    was_training = unet.training, text_encoder.training
    unet.eval(), text_encoder.eval()
    context = text_encoder(input_ids[idx].to(device))[0]
    terms = diffusion.training_losses(lambda x, tt: unet(x, tt, encoder_hidden_states=context).sample,
                                      z0, t, noise)
    unet.train(was_training[0]), text_encoder.train(was_training[1])
    return {f"val_{k}": v.mean().item() for k, v in terms.items()}


# ----------------------------------------------------------------------------------------------
# 4. The run
# ----------------------------------------------------------------------------------------------

def train(cfg: LDMConfig) -> dict:
    accelerator = make_accelerator(cfg.train.mixed_precision)
    set_seed(cfg.train.seed)
    run_dir = cfg.run_dir
    if cfg.train.batch_size % accelerator.num_processes:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide by the number of processes "
                         f"({accelerator.num_processes})")
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    warn_if_cpu_threads_capped(accelerator)

    # Data and components.
    with accelerator.main_process_first():  # built-in data is generated once, by the main process
        data_dir = resolve_data_dir(cfg.data.dataset, cfg.data.data_root, "train", cfg.data.resolution)
        ds = load_image_caption_dataset(data_dir, cfg.data.image_column, cfg.data.caption_column)
    captions = [str(c) for c in ds[cfg.data.caption_column]]
    comp = build_components(cfg, captions)
    vae, text_encoder, unet, tokenizer = comp["vae"], comp["text_encoder"], comp["unet"], comp["tokenizer"]
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(comp["train_text_encoder"])
    diffusion = GaussianDiffusion.from_scheduler_config(comp["scheduler"].config)

    # Latents (cached) and token ids (tokenised once).
    # The main process names the cache; the others take its name rather than hash files themselves.
    name = [_fingerprint(vae, data_dir, cfg) if accelerator.is_main_process else None]
    name = broadcast_object_list(name)[0] if accelerator.num_processes > 1 else name[0]
    cache_path = Path(cfg.data.cache_dir) / f"{name}.safetensors"
    image_ds = ImageCaptionDataset(ds, cfg.data.resolution, cfg.data.image_column, cfg.data.caption_column,
                                   cfg.data.center_crop)
    latents = cache_latents(vae, image_ds, cache_path, accelerator)
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    latent_std = check_latent_scale(latents, scale, shift)
    input_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    train_set = torch.utils.data.TensorDataset(latents["mean"], latents["std"], input_ids)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.train.batch_size // accelerator.num_processes, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.train.seed), num_workers=cfg.train.num_workers)
    if len(loader) == 0:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the dataset ({len(train_set)} images)")

    # Optimisation.
    params = [{"params": unet.parameters(), "lr": cfg.train.learning_rate}]
    if comp["train_text_encoder"]:
        params.append({"params": text_encoder.parameters(),
                       "lr": cfg.train.text_encoder_learning_rate or cfg.train.learning_rate})
    optimizer = torch.optim.AdamW(params, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                  weight_decay=cfg.train.weight_decay,
                                  fused=accelerator.device.type == "cuda" or None)
    # A prepared scheduler steps once per process per step, hence the factor (diffusers' convention).
    n_proc = accelerator.num_processes
    schedules = {"constant": "constant_with_warmup", "cosine": "cosine"}
    if cfg.train.lr_schedule not in schedules:
        raise ValueError(f"train.lr_schedule={cfg.train.lr_schedule!r} is not one of {sorted(schedules)}")
    lr_sched = get_scheduler(schedules[cfg.train.lr_schedule], optimizer,
                             num_warmup_steps=cfg.train.warmup_steps * n_proc,
                             num_training_steps=cfg.train.max_steps * n_proc)
    if comp["train_text_encoder"]:
        unet, text_encoder, optimizer, loader, lr_sched = accelerator.prepare(
            unet, text_encoder, optimizer, loader, lr_sched)
    else:  # a frozen encoder has no gradients for DDP to synchronise: it is only moved
        unet, optimizer, loader, lr_sched = accelerator.prepare(unet, optimizer, loader, lr_sched)
        text_encoder.to(accelerator.device)
    vae.to(accelerator.device)
    empty_ids = empty_ids.to(accelerator.device)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", accelerator.is_main_process)
    gen = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed + accelerator.process_index)

    def validate() -> dict:
        return validation_loss(diffusion, unet, text_encoder, latents, input_ids, scale, shift,
                               seed=cfg.train.seed)

    # Steps.
    metrics.write(step=0, **validate())
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    step, epoch, t_start = 0, 0, time.time()
    window, t_window = {}, time.time()  # running sums of the loss terms since the last log line
    row: dict = {}
    bar = tqdm(total=cfg.train.max_steps, desc="training", disable=not accelerator.is_main_process)
    unet.train()
    text_encoder.train(comp["train_text_encoder"])
    while step < cfg.train.max_steps:
        for batch in loader:
            with accelerator.autocast():
                terms = batch_loss(diffusion, unet, text_encoder, batch, empty_ids, scale, shift, gen, cfg)
                loss = terms["loss"].mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            # Sums stay on the device: one host sync per log line, not per step.
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + v.detach().mean()
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                n = step - (step - 1) // cfg.train.log_every * cfg.train.log_every
                row = {"step": step, "epoch": epoch, **{k: (v / n).item() for k, v in window.items()},
                       "lr": lr_sched.get_last_lr()[0],
                       "images_per_s": n * cfg.train.batch_size / (time.time() - t_window)}
                metrics.write(**row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                window, t_window = {}, time.time()
            if step >= cfg.train.max_steps:
                break
        epoch += 1
    bar.close()
    train_time = time.time() - t_start
    metrics.write(step=step, **validate())

    # Export: the pipeline folder, a sample grid, the loss plot and a summary.
    accelerator.wait_for_everyone()
    result = {"steps": step, "train_time_s": round(train_time, 1),
              "images_per_s": round(step * cfg.train.batch_size / train_time, 1), "latent_std": round(latent_std, 3)}
    if accelerator.is_main_process:
        unet_u, te_u = accelerator.unwrap_model(unet).eval(), accelerator.unwrap_model(text_encoder).eval()
        pipe = make_pipeline(comp, unet_u, te_u, cfg.sample.scheduler)
        atomic_save_dir(lambda d: pipe.save_pretrained(d, safe_serialization=True), run_dir / "pipeline")
        prompts = cfg.sample.prompts or sorted(set(captions))[:8]
        grid = sample_grid(pipe, prompts, cfg.sample.seeds, cfg.sample.num_inference_steps,
                           cfg.sample.guidance_scale)
        atomic_save(lambda p: grid.save(p, format="PNG"), run_dir / "samples" / f"step-{step}.png")
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", keys=("loss", "mse"))
        final = {"final_loss": round(row.get("loss", math.nan), 5), **result}
        metrics.write(step=step, **final)
        print(format_summary(f"run {cfg.name}", {
            **final, "pipeline": run_dir / "pipeline", "samples": run_dir / "samples" / f"step-{step}.png",
            "loss plot": run_dir / "loss.png", "metrics": run_dir / "metrics.jsonl"}))
        result = final
    accelerator.end_training()
    return result
