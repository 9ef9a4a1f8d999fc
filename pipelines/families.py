"""Model families a pipeline folder can hold, recognised from the folder: Stable Diffusion 1.x/2.x ("sd": one
text encoder) and Stable Diffusion XL ("sdxl": two text encoders, a U-Net with added text/time conditions)."""

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


def family_of(folder) -> str | None:
    """The family of a local diffusers pipeline folder, None for anything else (a hub id, a missing folder)."""
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text(encoding="utf-8"))
    unet_config = Path(folder) / "unet" / "config.json"
    text_time = unet_config.is_file() and \
        json.loads(unet_config.read_text(encoding="utf-8")).get("addition_embed_type") == "text_time"
    return "sdxl" if "text_encoder_2" in index or text_time else "sd"


def pipeline_class(family: str, task: str = "text2image"):
    """A family's pipeline class for ``task`` (text2image, img2img, inpaint), loaded by name (as diffusers reads
    ``_class_name``)."""
    import importlib

    module, name = PIPELINES[family][task].split(":")
    return getattr(importlib.import_module(module), name)
