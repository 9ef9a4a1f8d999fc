"""Writing folders so that an interrupted save never leaves a half-written one in place."""

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the complete folder ``tmp`` to ``path``; an existing ``path`` is set aside first and removed only
    once the new one is in place."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(write_fn, path: str | Path) -> None:
    """Call ``write_fn(tmp_path)`` then rename into ``path``, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def usual_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask gives new files and folders: mkdtemp makes the
    folder 0700, and libraries that write through temporary files (safetensors, diffusers' configs) leave them
    0600, so a model folder shared with other users or a container could not be read."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, 0o666 & ~mask)


def atomic_save_dir(write_fn, path: str | Path) -> None:
    """Call ``write_fn(tmp_dir)`` then swap the folder into ``path``; the old folder survives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp."))
    try:
        write_fn(tmp)
        usual_modes(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
