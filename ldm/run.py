"""Run-folder conventions shared by both trainers: metrics as JSON lines, plots and grids as PNG,
atomic writes, and the closing summary."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from PIL import Image

from pipelines.files import atomic_save, atomic_save_dir, replace_dir  # noqa: F401  (the trainer imports them from here)

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and, when given a folder, the numbers and
    images to TensorBoard (main process only)."""

    def __init__(self, path: str | Path, enabled: bool = True, fresh: bool = True,
                 tensorboard_dir: str | Path | None = None):
        self.path, self.enabled = Path(path), enabled
        self.start = time.time()
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:  # a new run under an old name starts a new file rather than mixing two runs
                self.path.unlink(missing_ok=True)
            if tensorboard_dir is not None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    logger.warning("tensorboard is not installed: metrics go to %s only", self.path)
                else:
                    self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, **row) -> None:
        if not self.enabled:
            return
        row = {"time_s": round(time.time() - self.start, 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None and "step" in row:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, row["step"])

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if self.tb is not None:
            import numpy as np

            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def rows(self) -> list[dict]:
        return read_metrics(self.path) if self.enabled and self.path.exists() else []

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (written by an interrupted run after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_save(lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in keep)), self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str | Path, png_path: str | Path, keys: tuple[str, ...] = ("loss",)) -> None:
    """Plot each key of metrics.jsonl against ``step`` (log scale when positive) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
            if all(v > 0 for _, v in pts):
                ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save(lambda p: fig.savefig(p, format="png"), png_path)
    plt.close(fig)


def make_grid(images: list[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized PIL images into one image, row-major."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (pad + (i % ncols) * (w + pad), pad + (i // ncols) * (h + pad)))
    return grid


def format_summary(title: str, rows: dict) -> str:
    width = max(len(k) for k in rows)
    lines = [title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows.items()]
    return "\n".join(lines)


def warn_if_cpu_threads_capped(accelerator) -> None:
    """`accelerate launch` sets OMP_NUM_THREADS=1 on CPU unless told otherwise, which can make a
    single-process CPU run several times slower than it need be."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1 and torch.get_num_threads() < cores:
        logger.warning("training on CPU with %d of %d cores (OMP_NUM_THREADS=%s); pass "
                       "`--num_cpu_threads_per_process %d` to accelerate launch to use them all",
                       torch.get_num_threads(), cores, os.environ.get("OMP_NUM_THREADS"), cores)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_cpu_memory() -> bool:
    """Let glibc's allocator keep the memory a CPU training step frees, for the next step to reuse.

    By default it returns large blocks to the system and takes them back the next step, page by page: on the
    shapes preset (2 cores) that is about 38,000 page faults and 0.11 s of system CPU time per step, against
    none with freed memory kept; the step took 0.63 s against 0.66 s (mean of two runs of 40 steps each).
    Changes nothing but speed and the process's resident size; a no-op (False) where the C library is not
    glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def make_accelerator(mixed_precision: str = "no"):
    """An Accelerator that also forms a process group for several CPU processes.

    On a machine without GPUs, `accelerate launch --multi_gpu --num_processes N` starts N processes, but
    Accelerate only joins them (over gloo) when asked for the CPU; otherwise each would train alone and
    all would write the same run folder.
    """
    from accelerate import Accelerator

    from accelerate.state import AcceleratorState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and AcceleratorState._shared_state:
        # A second run in the same process (a notebook, the tests) may ask for another precision.
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=world > 1 and not torch.cuda.is_available())
    if accelerator.num_processes != world:
        raise RuntimeError(f"{world} processes were launched but Accelerate joined {accelerator.num_processes}")
    return accelerator
