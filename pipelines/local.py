"""Loading what a user names, and only that: a path is a local folder (a model on the Hugging Face Hub is asked
for by name only with an explicit ``hf://`` prefix), and a folder whose weight files lack a tensor its model has
(a truncated merge, a hand conversion), or hold ones it has not, is refused with their names instead of loading
with those layers left at random."""

from __future__ import annotations

import json
from pathlib import Path

HUB_PREFIX = "hf://"
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")  # the components whose weight files are checked


def resolve(name: str | Path) -> tuple[str, bool]:
    """(what to load, whether it is a local folder): ``hf://org/model`` is the Hub's ``org/model``; anything else
    must be a folder here, or it is refused naming the path."""
    text = str(name)
    if text.startswith(HUB_PREFIX):
        return text[len(HUB_PREFIX):], False
    if not Path(text).is_dir():
        raise FileNotFoundError(f"{text!r} is not a folder here (nothing is fetched from the Hugging Face Hub unless "
                                f"asked for: hf://<org>/<model>)")
    return text, True


def _file_keys(folder: Path) -> set[str] | None:
    """The tensor names of a component folder's safetensors weights (sharded or not); None without any."""
    from safetensors import safe_open

    index = sorted(folder.glob("*.safetensors.index.json"))
    files = sorted({folder / f for f in json.loads(index[0].read_text())["weight_map"].values()}) if index \
        else sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    return keys


def check_weights(pipe, folder: str | Path) -> None:
    """Raise ValueError when a component's weight files in ``folder`` miss a tensor of its model or hold one it
    does not have, naming them (a model loaded that way would draw with those layers at their random start)."""
    for name in WEIGHTED:
        model = getattr(pipe, name, None)
        keys = _file_keys(Path(folder) / name) if model is not None else None
        if keys is None:
            continue
        own = set(model.state_dict())
        missing, unexpected = sorted(own - keys), sorted(keys - own)
        if missing or unexpected:
            said = "; ".join(part for part in (
                f"{len(missing)} missing: {missing[:8]}" if missing else "",
                f"{len(unexpected)} it has no place for: {unexpected[:8]}" if unexpected else "") if part)
            raise ValueError(f"{Path(folder) / name} does not hold the weights its model needs ({said}); the folder is "
                             f"incomplete or made for another architecture, so it is not loaded")
