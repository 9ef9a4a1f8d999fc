"""The VAE shipped inside the package for the built-in datasets, and loading of any VAE folder."""

from __future__ import annotations

from pathlib import Path

BUILTIN_VAE_DIR = Path(__file__).parent / "pretrained" / "builtin"


def resolve_vae_path(spec: str) -> Path:
    """"builtin" -> the shipped VAE; anything else must be a diffusers AutoencoderKL folder."""
    path = BUILTIN_VAE_DIR if spec == "builtin" else Path(spec)
    if not (path / "config.json").is_file():
        hint = " (the package was installed without its shipped VAE)" if spec == "builtin" else ""
        raise FileNotFoundError(f"no AutoencoderKL folder (config.json + safetensors) at {str(path)!r}{hint}")
    return path


def load_vae(spec: str = "builtin"):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(resolve_vae_path(spec), use_safetensors=True)
