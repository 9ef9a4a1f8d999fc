"""How the latents diffusion runs on relate to a VAE's, one definition for training, the likelihood bound, the
pipelines' decoding and image-to-image's encoding.

A VAE's latent z becomes the diffusion model's z0 = (z - shift) * scale, with scale and shift from its config
(``scaling_factor``, and ``shift_factor`` where it has one, as SD3's and FLUX's VAEs do), so that z0 has about unit
variance; decoding undoes it. One latent pixel covers `vae_scale_factor` pixels along a side.
"""

from __future__ import annotations

import torch


def vae_scale_factor(vae) -> int:
    """How many pixels one latent covers along a side: each VAE level after the first halves the size.
    ``vae`` is an AutoencoderKL or anything with its config's ``block_out_channels``; None (a pixel-space
    model) is 1."""
    if vae is None:
        return 1
    return 2 ** (len(getattr(vae, "config", vae).block_out_channels) - 1)


def latent_scale_shift(vae) -> tuple[float, float]:
    """(scale, shift) of a VAE's config: ``scaling_factor`` and ``shift_factor`` (0 when it has none)."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def scale_latents(z: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """The VAE's latents ``z`` as the diffusion model sees them: z0 = (z - shift) * scale."""
    return (z - shift) * scale


def unscale_latents(latents: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """The inverse of `scale_latents`: z = z0 / scale + shift, for the VAE to decode."""
    latents = latents / scale
    return latents + shift if shift else latents
