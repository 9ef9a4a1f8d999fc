"""Speed switches shared by training and sampling: compilation of a model's repeated blocks (regional) or of
the whole model, and the memory layout. None of them changes the maths; outputs match eager ones up to float
rounding (tested on CPU).

Regional compilation (PyTorch's "regional compilation" recipe; diffusers' ``compile_repeated_blocks`` does it for
the transformer blocks alone) compiles each class of repeated block once per input shape and reuses the code for
every instance of that shape, so the warm-up is a fraction of a whole-model compile's. Here the regions are the
U-Net's and VAE decoder's resnet, transformer, down- and upsampling blocks: nearly all of their FLOPs.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Block classes compiled one by one under compile="regional" (diffusers' class names).
REGIONS = ("BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D")
COMPILE_MODES = ("regional", "full")
# A U-Net at several resolutions has more distinct block shapes than dynamo's default of 8 compiled versions
# per function, after which it silently runs the rest eagerly.
RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


def compile_model(model: torch.nn.Module, how: str, **kwargs) -> int:
    """``torch.compile`` ``model`` in place (parameter names and state dicts are unchanged): every block of
    `REGIONS` (``how="regional"``) or the whole model as one graph (``"full"``). ``kwargs`` go to
    ``torch.compile``; shapes are static (one compiled version per bucket or image size). Returns how many
    modules were compiled."""
    if how not in COMPILE_MODES:
        raise ValueError(f"compile={how!r} is not one of {list(COMPILE_MODES)}")
    _raise_recompile_limit()
    kwargs.setdefault("dynamic", False)
    if how == "full":
        model.compile(**kwargs)
        return 1
    blocks = [m for m in model.modules() if type(m).__name__ in REGIONS]
    if not blocks:
        raise ValueError(f"compile='regional' found none of {list(REGIONS)} in {type(model).__name__}; "
                         "use compile='full'")
    for m in blocks:
        m.compile(**kwargs)
    return len(blocks)


def uncompile(model: torch.nn.Module) -> None:
    """Undo `compile_model`: every module runs eagerly again."""
    for m in model.modules():
        m._compiled_call_impl = None


def is_compiled(model: torch.nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def set_channels_last(model: torch.nn.Module, on: bool) -> None:
    """NHWC weights for the convolutions (faster on GPUs' tensor cores; measured slower on CPU, so callers
    default it to CUDA only)."""
    model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
