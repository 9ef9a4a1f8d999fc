"""Reconstruction quality metrics on images in [0, 1], shape (B, C, H, W); per-image values (B,)."""

from __future__ import annotations

import torch

from ldm.metrics import frechet_distance  # re-exported: one definition for both stages

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; report this instead


def psnr(x: torch.Tensor, y: torch.Tensor, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """10 log10(1 / MSE) per image, for images in [0, 1]; capped at ``cap_db``."""
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-cap_db / 10)))).float()


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, averaged over valid positions
    and channels; C1 = (0.01)^2, C2 = (0.03)^2 for a data range of 1."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    x, y = x.double(), y.double()
    ch = x.shape[1]
    w = _gaussian_window(min(window, x.shape[-1], x.shape[-2]), sigma, ch).to(x.device)

    def filt(t):
        return torch.nn.functional.conv2d(t, w, groups=ch)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def latent_stats(latents: torch.Tensor) -> dict:
    """Per-channel mean and std of latents (B, C, h, w), and the overall std."""
    per_channel = latents.transpose(0, 1).flatten(1)
    return {"channel_mean": per_channel.mean(1).tolist(), "channel_std": per_channel.std(1).tolist(),
            "std": float(latents.std()), "mean": float(latents.mean())}


__all__ = ["psnr", "ssim", "latent_stats", "frechet_distance", "PSNR_CAP_DB"]
