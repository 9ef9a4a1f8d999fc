"""Checkpoints that lose nothing, shared by both trainers.

A checkpoint is a folder ``<run>/checkpoints/step-<N>`` holding Accelerate's full state (prepared models
as safetensors, optimizers, LR schedulers, the gradient scaler, every process's RNG states and the
registered objects such as EMA), copies of any folders the run's state needs beside its tensors (the
tokenizer learned from the captions), and ``train_state.json`` (step, epoch, position in the epoch, the
resolved config). It is written into a hidden temporary folder first and renamed into place once every
process has finished writing; only then are checkpoints beyond ``keep_last`` removed, so a failed or
interrupted save never costs the last good one. ``train_state.json`` is written last: a folder without
it is not a checkpoint.

Data order and the per-step noise are pure functions of (seed, step) in both trainers (`ldm.batches`), so
the step number is all the position a resume needs; it is stored with the epoch and batch index for people.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from .run import replace_dir

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "train_state.json"


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
        return found[-1]
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


class CheckpointManager:
    """Writes and prunes checkpoints under ``root``; every process must call :meth:`save` together."""

    def __init__(self, accelerator, root: str | Path, keep_last: int | None = 2):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last} must be at least 1 (or null to keep all)")
        self.accelerator, self.root, self.keep_last = accelerator, Path(root), keep_last

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
        try:
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
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
        """Restore everything Accelerate saved at ``path``; return the step to go on from."""
        self.accelerator.load_state(str(path))
        state = read_train_state(path)
        logger.info("resumed from %s (step %d)", path, state["step"])
        if state.get("batches_per_epoch") != batches_per_epoch:
            logger.warning("the checkpoint saw %s batches per epoch and this data gives %d: the data changed, so "
                           "the resumed run will not follow the interrupted one's order",
                           state.get("batches_per_epoch"), batches_per_epoch)
        return state["step"]
