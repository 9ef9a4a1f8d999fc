"""Stability's model metadata standard (``modelspec.*`` header entries of a ``.safetensors`` file, "SAI Model
Spec" 1.0.0), which model browsers and UIs read to tell what a file is: the architecture (Stable Diffusion 1.x,
2.x at 512 or 768-v, XL; a LoRA or textual inversion of one), its title, resolution and prediction type."""

from __future__ import annotations

from datetime import datetime, timezone

SPEC_VERSION = "1.0.0"
IMPLEMENTATIONS = {  # the codebase whose names a file in the original layout uses
    "stable-diffusion-v1": "https://github.com/CompVis/stable-diffusion",
    "stable-diffusion-v2-512": "https://github.com/Stability-AI/stablediffusion",
    "stable-diffusion-v2-768-v": "https://github.com/Stability-AI/stablediffusion",
    "stable-diffusion-xl-v1-base": "https://github.com/Stability-AI/generative-models",
}
ADAPTERS = ("lora", "textual-inversion")


def base_architecture(unet_config, scheduler_config) -> str:
    """The spec's architecture id of a model: XL (added text/time conditions), 2.x (a 1024-wide text context: at 768
    with v-prediction, else 512) or 1.x (anything else, our own sizes included)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "stable-diffusion-xl-v1-base"
    if unet_config.get("cross_attention_dim") == 1024:
        v = scheduler_config.get("prediction_type") == "v_prediction"
        return "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def modelspec(unet_config, scheduler_config, vae_factor: int, title: str, adapter: str | None = None,
              implementation: str | None = None, trigger_phrase: str | None = None,
              description: str | None = None, resolution: tuple[int, int] | None = None) -> dict[str, str]:
    """The ``modelspec.*`` entries of a model (or, with ``adapter``, a LoRA or textual inversion of it):
    ``implementation`` defaults to the original layout's codebase ("diffusers" for a file in diffusers' names);
    ``resolution`` (width, height) to the U-Net's sample size times ``vae_factor``."""
    if adapter is not None and adapter not in ADAPTERS:
        raise ValueError(f"adapter {adapter!r} is not one of {ADAPTERS}")
    base = base_architecture(unet_config, scheduler_config)
    if resolution is None:
        side = unet_config.get("sample_size") or 64
        side = side[0] if isinstance(side, (list, tuple)) else side
        resolution = (side * vae_factor, side * vae_factor)
    out = {"modelspec.sai_model_spec": SPEC_VERSION,
           "modelspec.architecture": f"{base}-{adapter}" if adapter else base,
           "modelspec.implementation": implementation or IMPLEMENTATIONS[base],
           "modelspec.title": title,
           "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
           "modelspec.prediction_type": "v" if scheduler_config.get("prediction_type") == "v_prediction"
           else scheduler_config.get("prediction_type", "epsilon")}
    if trigger_phrase:
        out["modelspec.trigger_phrase"] = trigger_phrase
    if description:
        out["modelspec.description"] = description
    return out
