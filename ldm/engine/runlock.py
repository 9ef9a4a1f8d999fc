"""One run per run folder: the main process holds an exclusive lock on ``<run>/.lock`` (with its PID written in
it) from set-up to the end of the run, so a second run started under the same name fails at once, naming the
holder, instead of writing into the same metrics file and replacing the first run's checkpoints. The lock goes
with the process: a killed run leaves no stale lock behind."""

from __future__ import annotations

import os
from pathlib import Path

LOCK_FILE = ".lock"
_HELD: dict[str, int] = {}  # lock path -> the descriptor this process holds it through


def lock_run_folder(run_dir: str | Path) -> None:
    """Take the run folder's lock, or raise ValueError naming the PID of the run that holds it. A run of this
    same process that ended without releasing it (an exception) gives it up: runs of one process follow each
    other."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        return
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        os.close(_HELD.pop(key))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ValueError(f"{run_dir} is in use by another run (PID {holder}); wait for it to end, or give this run "
                         f"another name=...") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def release_run_folder(run_dir: str | Path) -> None:
    """Give the run folder's lock back (the end of a run)."""
    fd = _HELD.pop(str((Path(run_dir) / LOCK_FILE).resolve()), None)
    if fd is not None:
        os.close(fd)
