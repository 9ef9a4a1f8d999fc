"""Train a KL autoencoder (diffusers ``AutoencoderKL``) with Accelerate, then measure its latent scale.

    accelerate launch train_autoencoder.py --config configs/autoencoder/builtin.yaml [key=value ...]
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm.checkpoint import CheckpointManager, list_checkpoints, resolve_resume, step_batches, step_seed
from ldm.config import save_config, to_yaml
from ldm.builtin_data import BUILTIN_DATASETS
from ldm.data import GlobalBatchSampler, ImageCaptionDataset, load_source
from ldm.run import (MetricsWriter, atomic_save, atomic_save_dir, format_summary, make_accelerator,
                     plot_curves, warn_if_cpu_threads_capped)

from .config import AutoencoderConfig
from .evaluate import reconstruct, reconstruction_grid
from .losses import D_LOSSES, PatchDiscriminator, adaptive_weight, generator_loss, kl_loss, reconstruction_loss
from .metrics import psnr as image_psnr

logger = logging.getLogger(__name__)


def load_or_build_vae(model_cfg, resolution: int) -> AutoencoderKL:
    """A new VAE from the config, or (``model.pretrained``) an existing one to fine-tune, whole or
    decoder only."""
    if model_cfg.train_part not in ("both", "decoder"):
        raise ValueError(f"model.train_part={model_cfg.train_part!r} is not 'both' or 'decoder'")
    if model_cfg.pretrained is None:
        if model_cfg.train_part != "both":
            raise ValueError("model.train_part='decoder' needs model.pretrained (an encoder to keep)")
        return build_vae(model_cfg, resolution)
    from .pretrained import load_vae

    vae = load_vae(model_cfg.pretrained)
    if model_cfg.train_part == "decoder":  # the latent space (encoder + quant_conv) stays as it is
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    return vae


def build_vae(model_cfg, resolution: int) -> AutoencoderKL:
    n = len(model_cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(model_cfg.block_out_channels), layers_per_block=model_cfg.layers_per_block,
        latent_channels=model_cfg.latent_channels, norm_num_groups=model_cfg.norm_num_groups,
        sample_size=resolution,
    )


class VAEForward(torch.nn.Module):
    """encode -> sample -> decode as one forward, so DDP wraps (and syncs gradients of) a single call."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        """x (B, 3, H, W) -> reconstruction from z = mean + std * eps, and the posterior's mean, logvar."""
        dist = self.vae.encode(x).latent_dist
        return self.vae.decode(dist.mean + dist.std * eps).sample, dist.mean, dist.logvar


def load_images(name: str, data_cfg, split: str) -> ImageCaptionDataset:
    """One source's images (any source `ldm.data.load_source` reads). Only the built-in datasets have a
    held-out split; for other sources the held-out numbers are measured on their training images."""
    if split != "train" and name not in BUILTIN_DATASETS:
        logger.warning("%s has no %r split: its held-out numbers are measured on its training images", name, split)
        split = "train"
    ds = load_source(name, split=split, data_root=data_cfg.data_root, resolution=data_cfg.resolution,
                     image_column=data_cfg.image_column, caption_column=data_cfg.caption_column)
    return ImageCaptionDataset(ds, data_cfg.resolution, data_cfg.image_column, data_cfg.caption_column,
                               data_cfg.center_crop)


def image_datasets(data_cfg, split: str) -> torch.utils.data.ConcatDataset:
    return torch.utils.data.ConcatDataset([load_images(name, data_cfg, split) for name in data_cfg.datasets])


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, loader, num_images: int, generator: torch.Generator,
                         with_shift: bool = False) -> tuple[float, float | None]:
    """(scaling_factor, shift_factor) from posterior samples over ``num_images`` images, so that
    (z - shift) * scale has zero mean (when shifted) and unit variance."""
    samples, seen = [], 0
    device = next(vae.parameters()).device
    for batch in loader:
        dist = vae.encode(batch["pixel_values"].to(device)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(device)
        samples.append((dist.mean + dist.std * noise).float().cpu())
        seen += len(samples[-1])
        if seen >= num_images:
            break
    z = torch.cat(samples)
    shift = float(z.mean()) if with_shift else None
    return float(1.0 / (z - (shift or 0.0)).std()), shift


class ProcessBatches:
    """This process's share of every step's global batch from ``start`` to ``stop``, as a DataLoader
    batch sampler (so loading workers run ahead while the model trains)."""

    def __init__(self, sampler: GlobalBatchSampler, start: int, stop: int, rank: int, per_process: int):
        self.sampler, self.start, self.stop = sampler, start, stop
        self.lo, self.hi = rank * per_process, (rank + 1) * per_process

    def __iter__(self):
        for _, _, batch in step_batches(self.sampler, self.start, self.stop):
            yield batch[self.lo:self.hi]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def train(cfg: AutoencoderConfig) -> dict:
    accelerator = make_accelerator(cfg.train.mixed_precision)
    tc = cfg.train
    set_seed(tc.seed)
    run_dir = cfg.run_dir
    resume_from = resolve_resume(tc.resume, run_dir / "checkpoints")  # a wrong path fails before any work
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    warn_if_cpu_threads_capped(accelerator)

    # 1. Data. Each step's global batch is a pure function of (seed, step); every process takes its slice.
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    if tc.batch_size % n_proc:
        raise ValueError(f"train.batch_size={tc.batch_size} must divide by the number of "
                         f"processes ({n_proc})")
    with accelerator.main_process_first():  # built-in data is generated once, by the main process
        train_ds = image_datasets(cfg.data, "train")
    sampler = GlobalBatchSampler(None, len(train_ds), tc.batch_size, tc.seed)
    micro = tc.batch_size // n_proc

    # 2. Model and optimisation.
    vae = load_or_build_vae(cfg.model, cfg.data.resolution)
    model = VAEForward(vae)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, cfg.data.resolution // f, cfg.data.resolution // f)
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=tc.learning_rate,
                                  weight_decay=tc.weight_decay)
    # The LR schedule counts optimizer steps whatever the number of processes; stepped and checkpointed here.
    lr_sched = get_scheduler("cosine", optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_sched)
    lpips = None
    if tc.perceptual_weight > 0:
        from .perceptual import LPIPS

        lpips = LPIPS.from_file(tc.lpips_path).to(accelerator.device)
    use_disc = tc.disc_weight > 0
    if use_disc:
        if tc.disc_loss not in D_LOSSES:
            raise ValueError(f"train.disc_loss={tc.disc_loss!r} is not one of {sorted(D_LOSSES)}")
        disc = PatchDiscriminator(3, tc.disc_channels, tc.disc_layers)
        if n_proc > 1:
            disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=tc.disc_learning_rate or tc.learning_rate,
                                     betas=(0.5, 0.9), weight_decay=0.0)
        disc, disc_opt = accelerator.prepare(disc, disc_opt)
        last_layer = accelerator.unwrap_model(model).vae.decoder.conv_out.weight
    ema = None
    if tc.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(model).vae.parameters(), decay=tc.ema_decay, foreach=True)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    # 3. Resume.
    ckpt = CheckpointManager(accelerator, run_dir / "checkpoints", tc.keep_last)
    start_step = ckpt.load(resume_from, len(sampler)) if resume_from is not None else 0
    metrics = MetricsWriter(run_dir / "metrics.jsonl", accelerator.is_main_process, fresh=start_step == 0,
                            tensorboard_dir=run_dir / "tensorboard" if tc.tensorboard else None)
    metrics.truncate_after(start_step)

    # 4. Steps.
    bar = tqdm(total=tc.max_steps, initial=start_step, desc="autoencoder", disable=not accelerator.is_main_process)
    step = start_step
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=ProcessBatches(sampler, start_step, tc.max_steps, rank, micro),
        num_workers=tc.num_workers)
    for (step, epoch, batch), data in zip(step_batches(sampler, start_step, tc.max_steps), loader):
        x = data["pixel_values"].to(accelerator.device)  # (b, 3, H, W)
        g = torch.Generator().manual_seed(step_seed(tc.seed, step))
        eps = torch.randn((len(batch), *latent_shape), generator=g)[rank * micro:(rank + 1) * micro]
        gan_on = use_disc and step >= tc.disc_start
        with accelerator.autocast():
            # 1. the autoencoder's step: reconstruction (+ LPIPS) + KL (+ adaptive GAN term)
            recon, mean, logvar = model(x, eps.to(accelerator.device))
            rec = reconstruction_loss(recon, x, tc.l1_weight, tc.l2_weight)
            if lpips is not None:
                rec = rec + tc.perceptual_weight * lpips(recon.float(), x.float()).mean()
            kl = kl_loss(mean, logvar)
            loss = rec + tc.kl_weight * kl
            if gan_on:
                disc.requires_grad_(False)  # the autoencoder's step must not train the discriminator
                g_loss = generator_loss(disc(recon), tc.disc_loss)
                d_weight = tc.disc_weight * adaptive_weight(rec, g_loss, last_layer)
                loss = loss + d_weight * g_loss
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(model).vae.parameters())
        if gan_on:  # 2. the discriminator's step, on real images and detached reconstructions
            disc.requires_grad_(True)
            with accelerator.autocast():
                d_loss = D_LOSSES[tc.disc_loss](disc(x), disc(recon.detach()))
            accelerator.backward(d_loss)
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        if done % tc.log_every == 0 or done == tc.max_steps:
            row = {"step": done, "epoch": epoch, "loss": loss.item(), "rec": rec.item(), "kl": kl.item(),
                   "lr": lr_sched.get_last_lr()[0]}
            if gan_on:
                row.update(g_loss=g_loss.item(), d_loss=d_loss.item(), d_weight=float(d_weight))
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            metrics.write(**row)
        if tc.checkpoint_every and (done % tc.checkpoint_every == 0 or done == tc.max_steps):
            ckpt.save(done, len(sampler), to_yaml(cfg))
        step = done
    bar.close()

    # 5. Latent scale, held-out quality, export (main process).
    accelerator.wait_for_everyone()
    result = {}
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.eval()
        # A plain loader: the prepared one would wait for the other processes at every batch.
        scale_loader = torch.utils.data.DataLoader(train_ds, batch_size=64, shuffle=True,
                                                   generator=torch.Generator().manual_seed(cfg.train.seed))
        if ema is not None:  # export the averaged weights
            ema.copy_to(vae.parameters())
        scale, shift = measure_latent_scale(vae, scale_loader, cfg.train.scale_num_images,
                                            torch.Generator().manual_seed(cfg.train.seed), cfg.train.measure_shift)
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        result = {"steps": step, "scaling_factor": scale, "shift_factor": shift}
        # Held-out reconstructions, each dataset encoded once; PSNR per dataset and over all of them.
        originals, recons = [], []
        for name in cfg.data.datasets:
            one = image_datasets(dataclasses.replace(cfg.data, datasets=[name]), "heldout")
            o, r, _ = reconstruct(vae, torch.utils.data.DataLoader(one, batch_size=64), vae.device)
            result[f"heldout_psnr_db_{Path(name).name}"] = float(image_psnr(o, r).mean())
            originals.append(o)
            recons.append(r)
        originals, recons = torch.cat(originals), torch.cat(recons)
        result["heldout_psnr_db"] = float(image_psnr(originals, recons).mean())
        metrics.write(step=step, **result)
        metrics.close()
        atomic_save_dir(lambda d: vae.save_pretrained(d, safe_serialization=True), run_dir / "vae")
        if cfg.export_dir:
            atomic_save_dir(lambda d: shutil.copytree(run_dir / "vae", d, dirs_exist_ok=True), Path(cfg.export_dir))
        grid = reconstruction_grid(originals, recons)
        atomic_save(lambda p: grid.save(p, format="PNG"), run_dir / "reconstructions.png")
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", keys=("loss", "rec"))
        print(format_summary(f"autoencoder run {cfg.name}", {
            **{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()},
            "vae": run_dir / "vae", "reconstructions": run_dir / "reconstructions.png",
            "metrics": run_dir / "metrics.jsonl", "exported to": cfg.export_dir or "-",
            "checkpoints": ", ".join(str(p) for p in list_checkpoints(ckpt.root)) or "-"}))
    accelerator.end_training()
    return result
