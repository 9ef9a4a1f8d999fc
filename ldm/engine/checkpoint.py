"""Checkpoints that lose nothing, shared by both trainers.

A checkpoint is a folder ``<run>/checkpoints/step-<N>`` holding Accelerate's full state (prepared models
as safetensors, optimizers, LR schedulers, the gradient scaler, every process's RNG states and the
registered objects such as EMA) or, for a run that shards its weights (FSDP), a sharded checkpoint in
``sharded/`` (`ldm.engine.sharding`: each process's shards in safetensors, readable on any number of
processes), copies of any folders the run's state needs beside its tensors (the
tokenizer learned from the captions), and ``train_state.json`` (step, epoch, position in the epoch, the
resolved config). It is written into a hidden temporary folder first and renamed into place once every
process has finished writing; only then are checkpoints beyond ``keep_last`` removed, so a failed or
interrupted save never costs the last good one. ``train_state.json`` is written last: a folder without
it is not a checkpoint.

Data order and the per-step noise are pure functions of (seed, step) in both trainers (`ldm.data.batches`), so
the step number is all the position a resume needs; it is stored with the epoch and batch index for people.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from pipelines.files import replace_dir

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "train_state.json"
SHARDED_DIR = "sharded"  # a sharded run's checkpoint (`ldm.engine.sharding`)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """``None``/"" -> no resume; "latest" -> the newest checkpoint under ``root`` (or a fresh start when
    there is none yet); anything else must be an existing checkpoint folder."""
    if resume in (None, "", "none"):
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            logger.info("resume=latest: no checkpoint under %s yet, starting from step 0", root)
            return None
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            logger.warning("resume=latest: skipping %s, which is damaged (%s)", path, problem)
        raise ValueError(f"train.resume=latest: every checkpoint under {root} is damaged "
                         f"({[p.name for p in found]}); give a checkpoint folder or start a new run")
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={resume!r} does not exist; give 'latest' or a checkpoint "
                                f"folder such as {Path(root) / 'step-1000'}")
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"train.resume={resume!r} is not a complete checkpoint (no {STATE_FILE}); "
                         f"complete ones under {root}: {[p.name for p in list_checkpoints(root)]}")
    return path


def read_train_state(path: str | Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (unreadable state file, a truncated or corrupt
    safetensors file), or None when it looks whole. Reads headers only."""
    from safetensors import safe_open

    path = Path(path)
    try:
        state = read_train_state(path)
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{STATE_FILE}: {e}"
    files = sorted(path.rglob("*.safetensors"))
    if not files:
        return "no model weights (*.safetensors)"
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    st.get_slice(key)
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            return f"{f.name}: {e}"
        if f.stat().st_size < 8:
            return f"{f.name}: truncated"
    return None


# ----------------------------------------------------------------------------------------------
# State of objects that are not prepared modules or optimizers (LR schedule, EMA): safetensors for the
# tensors, JSON for the rest. Nothing in a checkpoint is unpickled beyond what torch's weights_only loader
# allows, so a tampered checkpoint cannot run code.
# ----------------------------------------------------------------------------------------------

def split_state(value, tensors: dict, key: str, copy: bool = True):
    """``value`` (nested dicts and lists) as JSON-able structure, its tensors moved into ``tensors`` by dotted path
    (``copy``: as contiguous CPU copies; else as they are, e.g. sharded tensors to be read into in place)."""
    if torch.is_tensor(value):
        tensors[key] = value.detach().cpu().contiguous() if copy else value
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[k, split_state(v, tensors, f"{key}.{k}", copy)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [split_state(v, tensors, f"{key}.{i}", copy) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {key!r} without pickle")


def join_state(value, tensors: dict):
    """The inverse of `split_state`."""
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {k: join_state(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [join_state(v, tensors) for v in value]
    return value


def save_object_state(obj, folder: Path, name: str) -> None:
    """``obj.state_dict()`` as ``<name>.json`` (structure and numbers) and ``<name>.safetensors`` (tensors)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    skeleton = split_state(obj.state_dict(), tensors, name)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_object_state(obj, folder: Path, name: str) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / f"{name}.safetensors"))
    obj.load_state_dict(join_state(json.loads((folder / f"{name}.json").read_text()), tensors))


def check_safe(path: Path) -> None:
    """Refuse a checkpoint holding a file that would need full unpickling to load: Accelerate's custom-object
    pickles (written by older versions), or any .bin/.pt/.pkl that torch's weights_only loader rejects."""
    from accelerate.utils import load as weights_only_load

    custom = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if custom:
        raise ValueError(f"checkpoint {path} holds pickled objects {custom}; loading a pickle can run arbitrary "
                         f"code, so they are refused (checkpoints of this version store them as JSON + "
                         f"safetensors). Start a new run, or resume from a checkpoint this version wrote")
    for f in sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pkl")):
        try:
            weights_only_load(str(f), map_location="cpu")  # weights_only=True: tensors and plain data only
        except Exception as e:
            raise ValueError(f"checkpoint file {f} cannot be loaded safely (torch's weights_only loader refused "
                             f"it: {type(e).__name__}: {str(e).splitlines()[0][:200]}); refusing to resume from "
                             f"{path}") from None


class CheckpointManager:
    """Writes and prunes checkpoints under ``root``; every process must call :meth:`save` together."""

    def __init__(self, accelerator, root: str | Path, keep_last: int | None = 2, objects: dict | None = None,
                 training=None, sharded: bool = False):
        """``objects``: {name: object with state_dict/load_state_dict} saved beside Accelerate's state (the LR
        schedule, EMA), without pickle. ``training``: the run's `TrainingState` (trained modules, optimizer, EMA
        by name), which reads a sharded checkpoint into any run; ``sharded``: write sharded checkpoints (FSDP)
        with it instead of Accelerate's state."""
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last} must be at least 1 (or null to keep all)")
        self.accelerator, self.root, self.keep_last = accelerator, Path(root), keep_last
        self.objects = objects if objects is not None else {}
        self.training, self.sharded = training, sharded

    def save(self, step: int, batches_per_epoch: int, config_yaml: str, files: dict | None = None, **extra) -> Path:
        """Write the full training state at ``step``, with the data position and the resolved config (and
        any JSON-able ``extra``) in train_state.json, and a copy of each folder of ``files`` ({name: folder})
        that the run's state needs beside its tensors (such as a tokenizer learned at the start)."""
        state = {"epoch": step // batches_per_epoch, "batch_in_epoch": step % batches_per_epoch,
                 "batches_per_epoch": batches_per_epoch, "config": config_yaml, **extra}
        acc = self.accelerator
        final = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir()
        acc.wait_for_everyone()
        for obj in self.objects.values():  # state that lives on every process (a stream's position)
            if hasattr(obj, "gather_state"):
                obj.gather_state()
        try:
            if self.sharded:  # every process writes its shards
                self.training.save(tmp / SHARDED_DIR, acc.is_main_process)
            else:
                acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                for name, obj in self.objects.items():
                    save_object_state(obj, tmp, name)
                for name, folder in (files or {}).items():
                    shutil.copytree(folder, tmp / name)
                body = json.dumps({"step": step, **state}, indent=1)
                (tmp / (STATE_FILE + ".tmp")).write_text(body)
                os.replace(tmp / (STATE_FILE + ".tmp"), tmp / STATE_FILE)
                replace_dir(tmp, final)  # the same step may be saved again (the end of a resumed run)
                self._prune()
        except BaseException:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                logger.error("saving the checkpoint for step %d failed; the previous ones are untouched: %s",
                             step, [p.name for p in list_checkpoints(self.root)])
            raise
        acc.wait_for_everyone()
        logger.info("saved checkpoint %s", final)
        return final

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for old in list_checkpoints(self.root)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | Path, batches_per_epoch: int) -> int:
        """Restore the training state saved at ``path``; return the step to go on from. A checkpoint with a file
        that could run code when loaded is refused before anything is read."""
        path = Path(path)
        check_safe(path)
        if (path / SHARDED_DIR).is_dir():
            if self.training is None:
                raise ValueError(f"checkpoint {path} is sharded (written under FSDP) and this trainer cannot read "
                                 f"sharded checkpoints")
            for name, obj in self.objects.items():  # before the tensors: the EMA's settings, then its shadows
                load_object_state(obj, path, name)
            self.training.load(path / SHARDED_DIR)
        elif self.sharded:
            raise ValueError(f"checkpoint {path} was written by a run that did not shard its weights; resume it "
                             f"without FSDP (DDP or one process: configs/accelerate/ddp.yaml), or start the sharded "
                             f"run afresh")
        else:
            self.accelerator.load_state(str(path))
            for name, obj in self.objects.items():
                load_object_state(obj, path, name)
        state = read_train_state(path)
        logger.info("resumed from %s (step %d)", path, state["step"])
        if state.get("batches_per_epoch") != batches_per_epoch:
            logger.warning("the checkpoint saw %s batches per epoch and this data gives %d: the data changed, so "
                           "the resumed run will not follow the interrupted one's order",
                           state.get("batches_per_epoch"), batches_per_epoch)
        return state["step"]
