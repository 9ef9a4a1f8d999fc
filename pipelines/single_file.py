"""Single-file checkpoints: a pipeline's U-Net, VAE and text encoder in one ``.safetensors`` file in Stable
Diffusion's original layout, or a Stable Diffusion XL pipeline's U-Net, VAE and two text encoders in SDXL's
(`pipelines.original_layout`): the layouts AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file`` read.

    to_single_file(pipe, "model.safetensors", dtype="fp16")   # also writes model.config/ beside it
    pipe = from_single_file("model.safetensors")              # configs from the file's metadata
    pipe = from_single_file("sd15.safetensors", config="/models/stable-diffusion-v1-5")
    pipe = from_single_file("sdxl.safetensors", config="/models/stable-diffusion-xl-base-1.0")  # an LDMXLPipeline
    materialize("model.safetensors", "pipeline")              # a diffusers folder, for code that reads folders

diffusers reads our files too: ``StableDiffusionPipeline.from_single_file("model.safetensors",
config="model.config", local_files_only=True)``, ``StableDiffusionXLPipeline`` for an SDXL file.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.files import atomic_save_dir
from pipelines.ldm_pipeline import LDMPipeline
from pipelines.original_layout import config_dir, to_single_file

__all__ = ["config_dir", "from_single_file", "materialize", "to_single_file"]


def from_single_file(path: str | Path, config: str | Path | None = None, **kwargs) -> LDMPipeline:
    """An LDMPipeline (an LDMXLPipeline for an SDXL file) from a single file; ``config`` as in
    `LDMPipeline.from_single_file`."""
    return LDMPipeline.from_single_file(path, config=config, **kwargs)


def materialize(path: str | Path, out_dir: str | Path, config: str | Path | None = None) -> Path:
    """Write the pipeline of a single file as a diffusers folder ``out_dir`` (LDMPipeline.save_pretrained), made
    beside it and moved in place complete; return its path."""
    pipe = from_single_file(path, config)
    atomic_save_dir(lambda d: pipe.save_pretrained(d, safe_serialization=True), out_dir)
    return Path(out_dir)
