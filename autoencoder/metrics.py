"""Statistics of a VAE's latents (its reconstruction metrics, PSNR and SSIM, are `ldm.eval.metrics`')."""

from __future__ import annotations

import torch


def latent_stats(latents: torch.Tensor) -> dict:
    """Per-channel mean and std of latents (B, C, h, w), and the overall std."""
    per_channel = latents.transpose(0, 1).flatten(1)
    return {"channel_mean": per_channel.mean(1).tolist(), "channel_std": per_channel.std(1).tolist(),
            "std": float(latents.std()), "mean": float(latents.mean())}

