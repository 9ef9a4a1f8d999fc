"""Reconstruction quality metrics on images in [0, 1], shape (B, C, H, W); per-image values (B,)."""

from __future__ import annotations

import torch

from ldm.metrics import PSNR_CAP_DB, frechet_distance, psnr, ssim  # re-exported: one definition for both stages


def latent_stats(latents: torch.Tensor) -> dict:
    """Per-channel mean and std of latents (B, C, h, w), and the overall std."""
    per_channel = latents.transpose(0, 1).flatten(1)
    return {"channel_mean": per_channel.mean(1).tolist(), "channel_std": per_channel.std(1).tolist(),
            "std": float(latents.std()), "mean": float(latents.mean())}


__all__ = ["psnr", "ssim", "latent_stats", "frechet_distance", "PSNR_CAP_DB"]
