"""The frozen first stage as the diffusion trainer sees it: load a VAE, encode pixels to a posterior, and the
fingerprint that keys cached latents. ``model.vae: none`` puts `PixelSpace` (the identity) in the VAE's place,
so the same trainer runs DDPM on pixels.

``ldm`` imports nothing from ``autoencoder`` (which trains VAEs on top of this package's engine); the only
thing it knows of it is where the VAE shipped for the built-in datasets lies, as package data.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import torch

from ldm.data.cache import Fingerprint
from pipelines.latents import scale_latents

PIXEL_SPACE = "none"


class PixelSpace(torch.nn.Module):
    """The identity in place of the autoencoder: "latents" are the pixels in [-1, 1] (3 channels, factor 1,
    scale 1), the posterior is a point (std 0), and decoding returns its input. It has no weights; an exported
    pipeline holds no VAE, and `LDMPipeline` outputs what the U-Net denoised."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(latent_channels=3, block_out_channels=[3], scaling_factor=1.0, shift_factor=None)

    def forward(self, x):
        return x


def is_pixel_space(vae) -> bool:
    return vae is None or isinstance(vae, PixelSpace)


def builtin_vae_dir() -> Path:
    """The VAE trained by ``make vae`` on the built-in datasets, shipped in ``autoencoder/pretrained/builtin``."""
    return Path(str(resources.files("autoencoder") / "pretrained" / "builtin"))


def resolve_vae_path(spec: str) -> Path:
    """"builtin" -> the shipped VAE; anything else must be a diffusers AutoencoderKL folder."""
    path = builtin_vae_dir() if spec == "builtin" else Path(spec)
    if not (path / "config.json").is_file():
        hint = " (the package was installed without its shipped VAE)" if spec == "builtin" else (
            "; model.vae=builtin is the VAE shipped for 32 px data, model.vae=none trains on pixels, and a Stable "
            "Diffusion folder's vae/ sub-folder is a VAE for photos")
        raise FileNotFoundError(f"model.vae: no AutoencoderKL folder (config.json + safetensors) at {str(path)!r}{hint}")
    return path


def load_vae(spec: str = "builtin"):
    """The VAE ``spec`` names: "builtin", an AutoencoderKL folder, or "none" (`PixelSpace`)."""
    from diffusers import AutoencoderKL

    if spec == PIXEL_SPACE:
        return PixelSpace()
    return AutoencoderKL.from_pretrained(resolve_vae_path(spec), use_safetensors=True)


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (B, C, h, w), float32, of pixels (B, 3, H, W) in [-1, 1]."""
    if is_pixel_space(vae):
        return pixels.float(), torch.zeros_like(pixels, dtype=torch.float32)
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def scaled_sample(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """z0 = (z - shift) * scale (`pipelines.latents.scale_latents`) for the posterior sample z = mean + std * eps."""
    return scale_latents(mean + std * eps, scale, shift)


def encoder_fingerprint(vae) -> str:
    """A hash of what encoding uses (the encoder and quant_conv weights, and the latent channel count): a
    decoder-only fine-tune keeps it, so cached latents stay valid."""
    if is_pixel_space(vae):
        return Fingerprint().value(["pixels-v1"]).hexdigest()
    used = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    tiles = ["tiled", vae.tile_sample_min_size, vae.tile_overlap_factor] if getattr(vae, "use_tiling", False) else []
    return Fingerprint().tensors(used).value([vae.config.latent_channels, "encoder-v1", *tiles]).hexdigest()
