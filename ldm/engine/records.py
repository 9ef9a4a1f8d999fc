"""What a run writes for people to read, for both trainers: metrics as JSON lines (and TensorBoard), curves and
image grids as PNG, and the closing summary."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from PIL import Image

from pipelines.files import atomic_save

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


def png_parameters(settings: dict) -> str:
    """AUTOMATIC1111's ``parameters`` text: the prompt, the negative prompt, then ``key: value`` pairs."""
    rest = {k: v for k, v in settings.items() if k not in ("prompt", "negative_prompt")}
    return (f"{settings['prompt']}\nNegative prompt: {settings.get('negative_prompt', '')}\n"
            + ", ".join(f"{k}: {v}" for k, v in rest.items()))


def format_summary(title: str, rows: dict) -> str:
    width = max(len(k) for k in rows)
    lines = [title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows.items()]
    return "\n".join(lines)
