"""Loading what a user names, and only that: a path is a local folder (a model on the Hugging Face Hub is asked
for by name only with an explicit ``hf://`` prefix), and a folder whose weight files lack a tensor its model has
(a truncated merge, a hand conversion), or hold ones it has not, is refused with their names instead of loading
with those layers left at random."""

from __future__ import annotations

import json
from pathlib import Path

HUB_PREFIX = "hf://"
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")  # the components whose weight files are checked
LIBRARIES = ("diffusers", "transformers", "pipelines", None)  # where a folder's component classes may come from


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


def check_folder(folder: str | Path) -> None:
    """Refuse, before any library reads it, a pipeline folder that names code of its own for a component (a
    module in the folder: diffusers would ask to run it) or whose component holds its weights only as pickles
    (which can run code when unpickled), naming them."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a pipeline folder (it has no model_index.json)")
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is not JSON ({e.msg} at line {e.lineno})") from None
    for name, entry in entries.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        if not _known_library(entry[0]) or (folder / name / f"{entry[0]}.py").exists():
            raise ValueError(f"{index} names code of its own for {name!r} ({entry[0]}.{entry[1]}); code that comes "
                             f"with a model folder is never run here: use a folder of diffusers and transformers "
                             f"components")
        from pipelines.pickles import PICKLE_SUFFIXES

        part = folder / name
        if part.is_dir() and not any(part.glob("*.safetensors")):
            pickles = sorted(f.name for f in part.iterdir() if f.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise ValueError(f"{part} holds its weights only as pickles ({', '.join(pickles)}), which can run code "
                                 f"when loaded and are not read; use a safetensors copy of the model (convert it "
                                 f"yourself only if you trust where it came from)")


def _known_library(library) -> bool:
    """A library a component class may come from: diffusers, transformers, this package, or one of diffusers'
    pipeline modules (a real Stable Diffusion 1.x index names its safety checker ``stable_diffusion``)."""
    import importlib.util

    if library in LIBRARIES:
        return True
    if not (isinstance(library, str) and library.isidentifier()):
        return False
    try:
        return importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None
    except ModuleNotFoundError:
        return False


def check_safetensors(path: str | Path, what: str) -> None:
    """Refuse a file that is not a readable safetensors file (cut short, damaged, another format), naming it and
    ``what`` it was given as."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file ({e}): damaged, cut short, or "
                         f"another format") from None


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
