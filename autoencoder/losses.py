"""Autoencoder losses as small named pieces; each returns a scalar tensor."""

from __future__ import annotations

import torch


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0,
                        l2_weight: float = 0.0) -> torch.Tensor:
    """Weighted sum of mean absolute and mean squared error over all pixels."""
    diff = recon.float() - target.float()
    return l1_weight * diff.abs().mean() + l2_weight * diff.square().mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent dims and averaged over the batch."""
    kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float())
    return kl.flatten(1).sum(1).mean()
