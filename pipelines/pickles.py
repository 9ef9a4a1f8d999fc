"""Checkpoints ``torch.save`` wrote (``.ckpt``, ``.pt``, ``.pth``, ``.bin``: pickles), read as tensors only."""

from __future__ import annotations

from pathlib import Path

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # checkpoint files torch.save wrote (pickles)


def read_pickle_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.ckpt`` (or ``.pt``/``.pth``/``.bin``) checkpoint, read only through torch's
    ``weights_only`` unpickler, which builds tensors and plain containers and nothing else: a file that asks to
    build anything more (code to run) is refused, and nothing in it runs. CompVis' ``{"state_dict": ...}``
    wrapper is unwrapped."""
    import pickle

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{str(path)!r} is a pickle that asks to build more than tensors ({str(e).splitlines()[0]}); "
                         f"it is refused and nothing in it ran. Use a .safetensors file of the model, or convert "
                         f"this one only if you trust where it came from") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a {type(data).__name__}, not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
