"""Model families a pipeline folder or a single file can hold, recognised from the folder's configs or the
file's key names: Stable Diffusion 1.x/2.x ("sd": one text encoder) and Stable Diffusion XL ("sdxl": two text
encoders, a U-Net with added text/time conditions)."""

from __future__ import annotations

import json
from pathlib import Path

# Each family's pipeline of each task, by import path: the pipelines import this module, not the reverse.
PIPELINES = {
    "sd": {"text2image": "pipelines.ldm_pipeline:LDMPipeline", "img2img": "pipelines.img2img:LDMImg2ImgPipeline",
           "inpaint": "pipelines.img2img:LDMInpaintPipeline"},
    "sdxl": {"text2image": "pipelines.sdxl:LDMXLPipeline", "img2img": "pipelines.sdxl:LDMXLImg2ImgPipeline",
             "inpaint": "pipelines.sdxl:LDMXLInpaintPipeline"},
}


# Key prefixes of a single file in the original layout: Stable Diffusion's U-Net, and SDXL base's second
# (OpenCLIP bigG) text encoder (as diffusers' single-file loader tells the families apart).
SD_FILE_KEY, XL_FILE_KEY = "model.diffusion_model.", "conditioner.embedders.1.model."


def family_of(path) -> str | None:
    """The family of a local diffusers pipeline folder or single ``.safetensors`` file in the original layout,
    None for anything else (a hub id, a missing path, a file of other weights)."""
    path = Path(path)
    if path.is_file():
        return _file_family(path)
    index_path = path / "model_index.json"
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text(encoding="utf-8"))
    unet_config = path / "unet" / "config.json"
    text_time = unet_config.is_file() and \
        json.loads(unet_config.read_text(encoding="utf-8")).get("addition_embed_type") == "text_time"
    return "sdxl" if "text_encoder_2" in index or text_time else "sd"


def _file_family(path: Path) -> str | None:
    """"sdxl" for a file holding SDXL base's OpenCLIP text encoder, "sd" for another with a U-Net in the
    original layout; None for a file that is neither safetensors nor a (weights-only) pickle checkpoint, or holds
    neither."""
    from pipelines.pickles import PICKLE_SUFFIXES, read_pickle_checkpoint

    if path.suffix in PICKLE_SUFFIXES:
        keys = list(read_pickle_checkpoint(path))
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    else:
        return None
    if any(k.startswith(XL_FILE_KEY) for k in keys):
        return "sdxl"
    if any(k.startswith(SD_FILE_KEY) for k in keys) and not any(k.startswith("conditioner.") for k in keys):
        return "sd"  # (an SDXL refiner's conditioner holds one OpenCLIP encoder: no family here)
    return None


def pipeline_class(family: str, task: str = "text2image"):
    """A family's pipeline class for ``task`` (text2image, img2img, inpaint), loaded by name (as diffusers reads
    ``_class_name``)."""
    import importlib

    module, name = PIPELINES[family][task].split(":")
    return getattr(importlib.import_module(module), name)
