"""Masked loss: per-image masks that say which pixels the loss trains on (kohya's and OneTrainer's "masked
training"), for subjects on backgrounds the model should not learn.

A mask comes from a dataset column (``data.mask_source: column``, ``data.mask_column``), from a
``<name>_mask.png`` beside each image of a folder (``file``) or from the image's alpha channel (``alpha``).
White (255) trains, black (0) does not, grey in between. It is cut exactly as its image (same resize, crop
and flip), area-averaged to latent size, cached beside the latents (both orientations when flips are on),
and turned into loss weights ``floor + (1 - floor) * mask`` (``data.mask_floor``); the loss of each image is
the weighted mean Σ w·err / Σ w, so its scale does not depend on the mask's area (`ldm.diffusion.mean_flat`).
An image without a mask (a missing file, no alpha channel) trains on every pixel; they are counted and logged.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from PIL import Image

from ldm.data.cache import CachePlace, Encoding, Fingerprint, latent_cache
from ldm.data.images import ImageTransform, open_mask, to_mask
from ldm.data.images import downsample

logger = logging.getLogger(__name__)

MASK_SOURCES = ("none", "column", "file", "alpha")
MASK_FILE_SUFFIX = "_mask"


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def mask_path(image_path: str | Path) -> Path:
    """``<folder>/<name>_mask.png`` for ``<folder>/<name>.<ext>``."""
    p = Path(image_path)
    return p.with_name(f"{p.stem}{MASK_FILE_SUFFIX}.png")


class MaskItems(torch.utils.data.Dataset):
    """The masks of a split for keys (index, flip, crop_seed), cut as `ldm.data.batches.PixelItems` cuts the images
    for the same key: (1, H, W) float32 in [0, 1]."""

    def __init__(self, split, resolution: int, image_column: str, center_crop: bool, random_crop: bool,
                 source: str, column: str = "mask", crop_scale: float = 1.0):
        if source not in MASK_SOURCES[1:]:
            raise ValueError(f"data.mask_source={source!r} is not one of {list(MASK_SOURCES[1:])}")
        self.split, self.image_column, self.source, self.column = split, image_column, source, column
        self.transform = ImageTransform(resolution, center_crop, random_crop, background=(0, 0, 0),
                                        crop_scale=crop_scale)
        self.paths = None
        self.mask_ds = None
        if source == "column":
            import datasets

            if column not in split.ds.column_names:
                raise ValueError(f"data.mask_source=column: the dataset has no column data.mask_column={column!r}; "
                                 f"columns: {split.ds.column_names}")
            feature = split.ds.features[column]  # images, {bytes, path} or absolute paths: decoded as images
            self.mask_ds = split.ds if isinstance(feature, datasets.Image) and feature.decode else \
                split.ds.cast_column(column, datasets.Image())
        if source == "file":
            import datasets

            stored = split.ds.cast_column(image_column, datasets.Image(decode=False))[image_column]
            if any(not s.get("path") for s in stored):
                raise ValueError("data.mask_source=file needs images read from files (a folder with metadata); "
                                 "this dataset holds image bytes: give the masks as a column (mask_source=column)")
            self.paths = [mask_path(s["path"]) for s in stored]
        self.unmasked = self.count_unmasked()
        if self.unmasked:
            logger.warning("%d of %d images have no mask (%s): they train on every pixel", self.unmasked,
                           len(split), {"file": f"no <name>{MASK_FILE_SUFFIX}.png beside them",
                                        "alpha": "no alpha channel", "column": "an empty mask cell"}[source])

    def count_unmasked(self) -> int:
        if self.source == "file":
            return sum(not p.is_file() for p in self.paths)
        if self.source == "column":
            return sum(v is None for v in self.mask_ds.cast_column(self.column, self._raw())[self.column])
        return sum(not has_alpha(self.split.ds[i][self.image_column]) for i in range(len(self.split)))

    @staticmethod
    def _raw():
        import datasets

        return datasets.Image(decode=False)

    def fingerprint(self) -> str:
        """What the masks depend on beyond the split's own fingerprint (the mask files, when they are files)."""
        fp = Fingerprint().value(["mask-v1", self.source, self.column])
        for p in self.paths or []:
            fp.files(p) if p.is_file() else fp.value(str(p))
        return fp.hexdigest()

    def __len__(self) -> int:
        return len(self.split)

    def mask_image(self, i: int) -> Image.Image:
        """Image i's mask as an 8-bit greyscale image of the image's size (all white when it has none)."""
        image = self.split.ds[i][self.image_column]
        mask = None
        if self.source == "alpha":
            if has_alpha(image):
                mask = image.convert("RGBA").getchannel("A")
        elif self.source == "file":
            if self.paths[i].is_file():
                mask = open_mask(self.paths[i])
        else:
            value = self.mask_ds[i][self.column]
            if value is not None:
                mask = to_mask(value)
        if mask is None:
            return Image.new("L", image.size, 255)
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.BILINEAR)
        return mask

    def __getitem__(self, key) -> torch.Tensor:
        i, flip, crop_seed = key
        cut = self.transform(self.mask_image(int(i)), size=self.split.sizes[int(i)], rng=random.Random(int(crop_seed)),
                             flip=bool(flip))
        return ((cut[:1] + 1) / 2).clamp(0, 1)


def mask_cache(items: MaskItems, split, factor: int, place: CachePlace, flips: bool) -> dict:
    """The masks of ``split`` at latent size, as a posterior cache whose "mean" is the mask (std zero): read
    with `ldm.data.cache.cached_posterior`, which also mirrors them with their images."""

    def encode(masks):
        low = downsample(masks.float(), factor)  # the fraction of each latent pixel's area masked in
        return low, torch.zeros_like(low)

    return latent_cache(Encoding(encode, items.fingerprint(), 1, factor), split, items, place, flips)
