"""On-disk, memory-mapped caches of everything a frozen network computes from the data.

A cache is a folder ``<cache_dir>/<fingerprint>/`` of ``.npy`` arrays and a ``meta.json``. The
fingerprint hashes whatever the arrays depend on (network weights, transform settings, the data), so
a change rebuilds the cache rather than reusing a stale one. The main process computes it into a
hidden temporary folder which is renamed into place when complete; every process then opens the
arrays with ``mmap_mode="r"``, so a dataset larger than memory trains from the page cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .run import atomic_save_dir

logger = logging.getLogger(__name__)


class Fingerprint:
    """A running SHA-256 over tensors, JSON-able values and file listings."""

    def __init__(self):
        self._h = hashlib.sha256()

    def tensors(self, state_dict: dict) -> "Fingerprint":
        for name, tensor in sorted(state_dict.items()):
            self._h.update(name.encode())
            self._h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
        return self

    def value(self, obj) -> "Fingerprint":
        self._h.update(json.dumps(obj, sort_keys=True, default=str).encode())
        return self

    def raw(self, data: bytes) -> "Fingerprint":
        self._h.update(data)
        return self

    def files(self, root: str | Path) -> "Fingerprint":
        """Names, sizes and modification times of every file under ``root`` (or of the file itself)."""
        root = Path(root)
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            st = p.stat()
            self._h.update(f"{p.relative_to(root) if p != root else p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return self

    def hexdigest(self, n: int = 16) -> str:
        return self._h.hexdigest()[:n]


class ArrayWriter:
    """Fills named ``.npy`` arrays of known shape in a folder, chunk by chunk, without holding them."""

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], dtype=np.float32):
        self.arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                       for name, shape in shapes.items()}

    def write(self, name: str, rows: np.ndarray | list[int], values: torch.Tensor) -> None:
        self.arrays[name][rows] = values.detach().float().cpu().numpy()

    def close(self) -> None:
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()


def open_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}


def build_or_open(cache_dir: str | Path, key: str, build: Callable[[Path], dict], accelerator,
                  what: str = "cache") -> tuple[dict[str, np.ndarray], dict]:
    """Return (arrays, meta) of the cache ``<cache_dir>/<key>``, built once by the main process with
    ``build(tmp_folder) -> meta`` when it does not exist yet."""
    folder = Path(cache_dir) / key
    if accelerator.is_main_process and not (folder / "meta.json").is_file():  # missing, or left incomplete

        def write(tmp: Path) -> None:
            (tmp / "meta.json").write_text(json.dumps(build(tmp), indent=1))

        atomic_save_dir(write, folder)
        logger.info("built %s %s", what, folder)
    elif accelerator.is_main_process:
        logger.info("reusing %s %s", what, folder)
    accelerator.wait_for_everyone()
    return open_arrays(folder), json.loads((folder / "meta.json").read_text())


def take(arr: np.ndarray, rows: Iterable[int]) -> torch.Tensor:
    """Rows of a memory-mapped array as a tensor (read in ascending order, returned in the asked order)."""
    rows = np.asarray(list(rows), dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows),) + arr.shape[1:], dtype=arr.dtype)
    out[order] = arr[rows[order]]
    return torch.from_numpy(out)
