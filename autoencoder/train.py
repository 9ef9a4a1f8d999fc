"""Train a KL autoencoder (diffusers ``AutoencoderKL``) on the shared engine, then measure its latent scale.

    accelerate launch train_autoencoder.py --config configs/autoencoder/builtin.yaml [key=value ...]

One step: reconstruction (+ LPIPS) + KL (+ the adaptive PatchGAN term from ``train.disc_start``) for the
autoencoder, then the discriminator's own step; the engine steps the autoencoder's optimizer, its LR schedule
and EMA. At the end: the latent scale (and shift), held-out PSNR, the exported VAE folder and a grid.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from autoencoder.config import AutoencoderConfig, check_config
from autoencoder.data import image_datasets
from autoencoder.evaluate import reconstruct, reconstruction_grid
from autoencoder.losses import (
    D_LOSSES,
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    kl_loss,
    reconstruction_loss,
)
from ldm.data.batches import VAE_POSTERIOR_STREAM, DatasetSource, GlobalBatchSampler, step_generator
from ldm.data.splits import report_bad_images
from ldm.engine.engine import Engine
from ldm.engine.errors import stoppable
from ldm.eval.metrics import psnr as image_psnr
from ldm.models.vae import load_vae
from pipelines.files import atomic_save, atomic_save_dir
from pipelines.latents import vae_scale_factor

logger = logging.getLogger(__name__)


def load_or_build_vae(model_cfg, resolution: int) -> AutoencoderKL:
    """A new VAE from the config, or (``model.pretrained``) an existing one to fine-tune, whole or
    decoder only."""
    if model_cfg.pretrained is None:
        return build_vae(model_cfg, resolution)
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


class AutoencoderStep:
    """One step's forward and backward: the autoencoder's losses, then (from ``disc_start``) the
    discriminator's step on real images and detached reconstructions. Returns the named terms."""

    def __init__(self, cfg: AutoencoderConfig, engine: Engine, model, latent_shape: tuple, disc=None, disc_opt=None,
                 lpips=None):
        self.cfg, self.tc, self.engine, self.model, self.latent_shape = cfg, cfg.train, engine, model, latent_shape
        self.disc, self.disc_opt, self.lpips = disc, disc_opt, lpips
        self.last_layer = engine.accelerator.unwrap_model(model).vae.decoder.conv_out.weight
        self.per_process = cfg.train.batch_size // engine.accelerator.num_processes

    def __call__(self, step: int, batch: dict) -> dict:
        tc, acc, device = self.tc, self.engine.accelerator, self.engine.device
        x = batch["data"]["pixel_values"].to(device)  # (b, 3, H, W)
        rank = acc.process_index
        g = step_generator(tc.seed, step, VAE_POSTERIOR_STREAM)  # posterior noise of the whole global batch
        eps = torch.randn((batch["global_size"], *self.latent_shape), generator=g)
        eps = eps[rank * self.per_process:(rank + 1) * self.per_process]
        gan_on = self.disc is not None and step >= tc.disc_start
        with acc.autocast():
            recon, mean, logvar = self.model(x, eps.to(device))
            rec = reconstruction_loss(recon, x, tc.l1_weight, tc.l2_weight)
            if self.lpips is not None:
                rec = rec + tc.perceptual_weight * self.lpips(recon.float(), x.float()).mean()
            kl = kl_loss(mean, logvar)
            loss = rec + tc.kl_weight * kl
            terms = {"loss": loss, "rec": rec, "kl": kl}
            if gan_on:
                self.disc.requires_grad_(False)  # the autoencoder's step must not train the discriminator
                g_loss = generator_loss(self.disc(recon), tc.disc_loss)
                d_weight = tc.disc_weight * adaptive_weight(rec, g_loss, self.last_layer)
                loss = loss + d_weight * g_loss
                terms.update(loss=loss, g_loss=g_loss, d_weight=d_weight)
        acc.backward(loss)
        if gan_on:  # the discriminator's step; the engine then steps the autoencoder's optimizer
            self.disc.requires_grad_(True)
            with acc.autocast():
                d_loss = D_LOSSES[tc.disc_loss](self.disc(x), self.disc(recon.detach()))
            acc.backward(d_loss)
            self.disc_opt.step()
            self.disc_opt.zero_grad(set_to_none=True)
            terms["d_loss"] = d_loss
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in terms.items()}


@stoppable
def train(cfg: AutoencoderConfig) -> dict:
    engine = Engine(cfg, check_config, "autoencoder")
    acc, tc = engine.accelerator, cfg.train
    bad: list = []
    with engine.setting_up(), acc.main_process_first():  # built-in data is generated once, by the main process
        train_ds = image_datasets(cfg.data, "train", bad)
    bad_report = report_bad_images(bad, cfg.run_dir, acc.is_main_process)
    source = DatasetSource(train_ds, GlobalBatchSampler(None, len(train_ds), tc.batch_size, tc.seed),
                           acc.process_index, tc.batch_size // acc.num_processes, tc.num_workers)
    vae = load_or_build_vae(cfg.model, cfg.data.resolution)
    f = vae_scale_factor(vae)
    latent_shape = (vae.config.latent_channels, cfg.data.resolution // f, cfg.data.resolution // f)
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    model, optimizer = acc.prepare(VAEForward(vae), optimizer)
    engine.optimize_with(optimizer, trained, tc.max_grad_norm, tc.lr_schedule, tc.warmup_steps)
    lpips = None
    if tc.perceptual_weight > 0:
        from autoencoder.perceptual import LPIPS

        lpips = LPIPS.from_file(tc.lpips_path).to(engine.device)
    disc = disc_opt = None
    if tc.disc_weight > 0:
        disc = PatchDiscriminator(3, tc.disc_channels, tc.disc_layers)
        if acc.num_processes > 1:
            disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=tc.disc_learning_rate or tc.learning_rate,
                                     betas=(0.5, 0.9), weight_decay=0.0)
        disc, disc_opt = acc.prepare(disc, disc_opt)
    engine.track_ema(list(acc.unwrap_model(model).vae.parameters()), tc.ema_decay)
    engine.fit(source, AutoencoderStep(cfg, engine, model, latent_shape, disc, disc_opt, lpips))
    acc.wait_for_everyone()
    result, paths = {}, {}
    if acc.is_main_process:
        with engine.ema_weights():  # export the averaged weights when EMA is on
            result, paths = finish_vae(cfg, acc.unwrap_model(model).vae.eval(), train_ds)
    if bad:
        result["bad_images_skipped"], paths["skipped images"] = len(bad), bad_report
    return engine.finish(result, paths, plot_keys=("loss", "rec"), modules=[model, *([disc] if disc is not None else [])])


def finish_vae(cfg: AutoencoderConfig, vae: AutoencoderKL, train_ds) -> tuple[dict, dict]:
    """Measure the latent scale (and shift) into the VAE's config, its held-out PSNR per dataset, then write the
    VAE folder (and its copy at ``export_dir``) and a reconstruction grid. Main process."""
    run_dir, tc = cfg.run_dir, cfg.train
    # A plain loader: a prepared one would wait for the other processes at every batch.
    scale_loader = torch.utils.data.DataLoader(train_ds, batch_size=64, shuffle=True,
                                               generator=torch.Generator().manual_seed(tc.seed))
    scale, shift = measure_latent_scale(vae, scale_loader, tc.scale_num_images,
                                        torch.Generator().manual_seed(tc.seed), tc.measure_shift)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    result = {"scaling_factor": scale, "shift_factor": shift}
    originals, recons = [], []  # each dataset encoded once: PSNR per dataset and over all of them
    for name in cfg.data.datasets:
        one = image_datasets(dataclasses.replace(cfg.data, datasets=[name]), "heldout")
        o, r, _ = reconstruct(vae, torch.utils.data.DataLoader(one, batch_size=64), vae.device)
        result[f"heldout_psnr_db_{Path(name).name}"] = float(image_psnr(o, r).mean())
        originals.append(o)
        recons.append(r)
    originals, recons = torch.cat(originals), torch.cat(recons)
    result["heldout_psnr_db"] = float(image_psnr(originals, recons).mean())
    atomic_save_dir(lambda d: vae.save_pretrained(d, safe_serialization=True), run_dir / "vae")
    if cfg.export_dir:
        atomic_save_dir(lambda d: shutil.copytree(run_dir / "vae", d, dirs_exist_ok=True), Path(cfg.export_dir))
    grid = reconstruction_grid(originals, recons)
    atomic_save(lambda p: grid.save(p, format="PNG"), run_dir / "reconstructions.png")
    return result, {"vae": run_dir / "vae", "reconstructions": run_dir / "reconstructions.png",
                    "exported to": cfg.export_dir or "-"}


def main(argv=None) -> None:
    from ldm.engine.cli import run

    run(AutoencoderConfig, train, "Train a KL autoencoder (the latent space of a latent diffusion model).", argv)


if __name__ == "__main__":
    main()
