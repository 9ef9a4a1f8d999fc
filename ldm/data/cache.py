"""On-disk, memory-mapped caches of everything a frozen network computes from the data.

A cache is a folder ``<cache_dir>/<fingerprint>/`` of ``.npy`` arrays and a ``meta.json``. The
fingerprint hashes whatever the arrays depend on (network weights, transform settings, the data), so
a change rebuilds the cache rather than reusing a stale one. It is built in a hidden temporary folder,
each process writing its share of the rows, and renamed into place when complete; every process then opens the arrays with ``mmap_mode="r"``, so a dataset larger than
memory trains from the page cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from accelerate.utils import broadcast_object_list

from ldm.engine.errors import check_stop
from pipelines.files import replace_dir

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


def open_arrays(folder: Path, mode: str = "r") -> dict[str, np.ndarray]:
    return {p.stem: np.load(p, mmap_mode=mode) for p in sorted(folder.glob("*.npy"))}


OWNER = "building-owner.json"


def remove_abandoned_builds(cache_dir: Path) -> None:
    """Delete the hidden folders of cache builds whose process is gone (killed mid-build); builds of live
    processes on this machine, and of other machines, are left alone."""
    for folder in cache_dir.glob(".*.building"):
        try:
            owner = json.loads((folder / OWNER).read_text())
        except (OSError, ValueError):
            continue  # being created right now, or not ours
        if owner.get("host") != socket.gethostname():
            continue
        try:
            os.kill(int(owner["pid"]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, OSError, KeyError, ValueError):
            continue
        logger.info("removing the abandoned cache build %s", folder)
        shutil.rmtree(folder, ignore_errors=True)


def build_or_open(cache_dir: str | Path, key: str, accelerator, what: str, shapes: dict[str, tuple[int, ...]],
                  fill: Callable[[dict[str, np.ndarray], int, int], None],
                  finish: Callable[[Path], dict]) -> tuple[dict[str, np.ndarray], dict]:
    """Return (arrays, meta) of the cache ``<cache_dir>/<key>``, building it first when it does not exist.

    The build is shared by every process: the main process allocates float32 arrays of ``shapes`` in a hidden
    folder, every process calls ``fill(arrays, rank, num_processes)`` to write its share of the rows, then the
    main process calls ``finish(folder) -> meta`` and renames the folder into place. All processes must call
    this together.
    """
    folder = Path(cache_dir) / key
    exists = (folder / "meta.json").is_file()
    accelerator.wait_for_everyone()  # every process has looked before anyone starts writing
    if exists:
        if accelerator.is_main_process:
            logger.info("reusing %s %s", what, folder)
    else:
        # A folder of this run's own (named after its main process), so that another run building the same
        # cache at the same time (two trainings started together on one dataset) writes elsewhere.
        owner = broadcast_object_list([f"{socket.gethostname()}-{os.getpid()}"])[0]
        building = folder.parent / f".{key}.{owner}.building"
        if accelerator.is_main_process:
            remove_abandoned_builds(Path(cache_dir))
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
            (building / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
            ArrayWriter(building, shapes).close()
        accelerator.wait_for_everyone()
        arrays = open_arrays(building, mode="r+")
        try:
            fill(arrays, accelerator.process_index, accelerator.num_processes)
        except BaseException:  # stopped or failed: the half-built cache goes
            del arrays
            if accelerator.is_main_process:
                shutil.rmtree(building, ignore_errors=True)
            raise
        for arr in arrays.values():
            arr.flush()
        del arrays
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta = finish(building)
            (building / OWNER).unlink()
            (building / "meta.json").write_text(json.dumps(meta, indent=1))
            if (folder / "meta.json").is_file():  # another run finished the same cache first: keep its copy
                shutil.rmtree(building, ignore_errors=True)
                logger.info("%s %s was built meanwhile by another run; using it", what, folder)
            else:
                replace_dir(building, folder)
                logger.info("built %s %s", what, folder)
    accelerator.wait_for_everyone()
    return open_arrays(folder), json.loads((folder / "meta.json").read_text())


def take(arr: np.ndarray, rows: Iterable[int]) -> torch.Tensor:
    """Rows of a memory-mapped array as a tensor (read in ascending order, returned in the asked order)."""
    rows = np.asarray(list(rows), dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows),) + arr.shape[1:], dtype=arr.dtype)
    out[order] = arr[rows[order]]
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------
# The two caches of the diffusion trainer
# ----------------------------------------------------------------------------------------------

@dataclass
class Encoding:
    """What a cache holds of each image: ``encode(pixels) -> (mean, std)``, each (B, channels, H / factor,
    W / factor), under ``key``, a hash of everything the encoding depends on (network weights, settings)."""

    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    key: str
    channels: int
    factor: int


@dataclass
class CachePlace:
    """Where a run's caches live and who builds them: every process of ``accelerator``, each reading images with
    ``num_workers`` loader workers."""

    cache_dir: str | Path
    accelerator: object
    num_workers: int = 0


def latent_cache(encoding: Encoding, split, items, place: CachePlace, flips: bool, batch_size: int = 32) -> dict:
    """Open (building once) the posterior cache of ``split`` (a VAE's, or any `Encoding`'s): per bucket b,
    "mean_b" and "std_b" (and "mean_flip_b", "std_flip_b" when ``flips``) of shape (n_b, C, h, w), with "rows" and
    "groups" mapping an image to its bucket and row. ``items[(i, flip, 0)]`` gives image i's pixels.

    Each bucket is encoded in chunks of ``batch_size`` images in a fixed order, chunk k by process
    k mod num_processes, so the cache is the same whatever the number of processes.
    """
    from tqdm.auto import tqdm

    n = len(split)
    groups = np.zeros(n, dtype=np.int64) if split.groups is None else np.asarray(split.groups)
    key = Fingerprint().value([encoding.key, split.fingerprint, n, flips, "v3"]).hexdigest()
    orientations = (("", False), ("_flip", True)) if flips else (("", False),)
    members = [np.flatnonzero(groups == b) for b in range(len(split.buckets))]
    c, f = encoding.channels, encoding.factor
    shapes = {f"{kind}{suffix}_{b}": (len(m), c, h // f, w // f)
              for b, ((h, w), m) in enumerate(zip(split.buckets, members)) if len(m)
              for kind in ("mean", "std") for suffix, _ in orientations}
    chunks = [(b, suffix, flip, start) for b, m in enumerate(members) for suffix, flip in orientations
              for start in range(0, len(m), batch_size)]

    def fill(arrays: dict, rank: int, world: int) -> None:
        mine = chunks[rank::world]
        keys = [[(int(i), flip, 0) for i in members[b][start:start + batch_size]] for b, _, flip, start in mine]
        loader = torch.utils.data.DataLoader(items, batch_sampler=keys, num_workers=place.num_workers)
        bar = tqdm(total=sum(len(k) for k in keys), desc="caching latents",
                   disable=not place.accelerator.is_local_main_process)
        for (b, suffix, _, start), pixels in zip(mine, loader):
            check_stop("caching latents")
            mean, std = encoding.encode(pixels)
            rows = slice(start, start + len(pixels))
            arrays[f"mean{suffix}_{b}"][rows] = mean.detach().float().cpu().numpy()
            arrays[f"std{suffix}_{b}"][rows] = std.detach().float().cpu().numpy()
            bar.update(len(pixels))
        bar.close()

    def finish(folder: Path) -> dict:
        rows = np.zeros(n, dtype=np.int64)
        for m in members:
            rows[m] = np.arange(len(m))
        np.save(folder / "rows.npy", rows)
        np.save(folder / "groups.npy", groups)
        return {"num_items": n, "flips": flips, "buckets": split.buckets}

    arrays, _ = build_or_open(place.cache_dir, key, place.accelerator, "latent cache", shapes, fill, finish)
    return arrays


def cached_posterior(arrays: dict, items: list[int], flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the posteriors of ``items`` (one bucket), mirrored where ``flip``; (B, C, h, w)."""
    groups = arrays["groups"][np.asarray(items)]
    b = int(groups[0])
    if (groups != b).any():
        raise ValueError(f"a batch mixes aspect buckets {sorted(set(groups.tolist()))}; batches must come from one")
    rows = arrays["rows"][np.asarray(items)]
    mean, std = take(arrays[f"mean_{b}"], rows), take(arrays[f"std_{b}"], rows)
    if flip.any():
        sel = flip.numpy()
        mean[flip] = take(arrays[f"mean_flip_{b}"], rows[sel])
        std[flip] = take(arrays[f"std_flip_{b}"], rows[sel])
    return mean, std


def text_cache(text_encoder, input_ids: torch.Tensor, empty_ids: torch.Tensor, cache_dir: str | Path,
               accelerator, batch_size: int = 256) -> dict:
    """Hidden states "embeds" (n, L, D) of every caption and "empty" (1, L, D) of the empty caption, computed
    once (by the main process: a text encoder pass is cheap next to the VAE's)."""
    key = "text-" + Fingerprint().tensors(text_encoder.state_dict()).value(
        [list(input_ids.shape), empty_ids.tolist()]).raw(input_ids.numpy().tobytes()).hexdigest()
    dim = text_encoder.config.hidden_size
    shapes = {"embeds": (len(input_ids), input_ids.shape[1], dim), "empty": (1, input_ids.shape[1], dim)}

    @torch.no_grad()
    def fill(arrays: dict, rank: int, world: int) -> None:
        if rank != 0:
            return
        device = accelerator.device
        te = text_encoder.to(device).eval()
        for s in range(0, len(input_ids), batch_size):
            check_stop("caching text embeddings")
            arrays["embeds"][s:s + batch_size] = te(input_ids[s:s + batch_size].to(device))[0].float().cpu().numpy()
        arrays["empty"][0:1] = te(empty_ids[None].to(device))[0].float().cpu().numpy()

    arrays, _ = build_or_open(cache_dir, key, accelerator, "text-embedding cache", shapes, fill,
                              lambda folder: {"num_captions": len(input_ids)})
    return arrays
