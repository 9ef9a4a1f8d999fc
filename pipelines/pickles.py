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
    import re
    import warnings

    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol: the refusal below says what matters
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        asked = re.search(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand \d+|[\w.]+ was not an allowed global",
                          str(e))
        raise ValueError(f"{str(path)!r} is a pickle that asks to build more than tensors"
                         f"{f' ({asked.group(0)})' if asked else ''}; it is refused and nothing in it ran. Use a "
                         f".safetensors file of the model") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a {type(data).__name__}, not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
