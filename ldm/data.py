"""Image + caption data through `datasets`: built-in datasets or a user's image folder.

A user's folder holds images and a ``metadata.jsonl`` with ``file_name`` and a caption column,
the layout `datasets`' ``imagefolder`` reads. Built-in datasets are generated into that same layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .builtin_data import BUILTIN_DATASETS, ensure_builtin

logger = logging.getLogger(__name__)


def resolve_data_dir(dataset: str, data_root: str = "data", split: str = "train", resolution: int = 32) -> Path:
    """A built-in name is generated on demand; anything else must be an existing folder."""
    if dataset in BUILTIN_DATASETS:
        return ensure_builtin(dataset, data_root, split=split, resolution=resolution)
    path = Path(dataset)
    if not path.is_dir():
        raise ValueError(f"dataset {dataset!r} is neither a built-in dataset {BUILTIN_DATASETS} "
                         f"nor an existing folder")
    return path


def load_image_caption_dataset(data_dir: str | Path, image_column: str = "image", caption_column: str = "text"):
    """Load an image folder (images + metadata.jsonl/csv) as a `datasets.Dataset`."""
    import datasets

    data_dir = Path(data_dir)
    if not any((data_dir / m).exists() for m in ("metadata.jsonl", "metadata.csv")):
        raise ValueError(f"{str(data_dir)!r} has no metadata.jsonl or metadata.csv with captions")
    ds = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train")
    for col in (image_column, caption_column):
        if col not in ds.column_names:
            raise ValueError(f"column {col!r} not in dataset {str(data_dir)!r}; columns: {ds.column_names}")
    return ds


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop to a square, map to [-1, 1]; returns (3, H, W)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.Resampling.BICUBIC)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = 0, 0
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Lazily transformed (image tensor, caption) pairs over a `datasets.Dataset`."""

    def __init__(self, ds, resolution: int, image_column: str = "image", caption_column: str = "text",
                 center_crop: bool = True):
        self.ds, self.resolution, self.center_crop = ds, resolution, center_crop
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[int(i)]
        return {"pixel_values": image_to_tensor(row[self.image_column], self.resolution, self.center_crop),
                "caption": str(row[self.caption_column])}
