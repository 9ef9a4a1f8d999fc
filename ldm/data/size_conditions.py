"""Stable Diffusion XL's per-image micro-conditions from the data path: where each training image came from and how
it was cut, as the U-Net's ``time_ids`` = (original height, original width, crop top, crop left, target height,
target width).

The original size is the file's (read from its header); the target is the image's bucket (or the square
``data.resolution``); the crop is the one `ImageTransform` makes for that image and batch key: resized to cover
the target, then cut at the centre, the top-left corner or a random offset from the key's crop seed. A mirrored
image's crop is measured from the other side (left' = resized width - left - target width), so the condition
describes the picture the U-Net sees. Nothing is stored: the conditions are a function of the file sizes and the
batch key (index, flip, crop seed), the same key the pixels and the latent cache use.
"""

from __future__ import annotations

import random

import torch

from ldm.data.images import ImageTransform
from ldm.data.sources import image_sizes


def crop_conditions(transform: ImageTransform, original: tuple[int, int], target: tuple[int, int], flip: bool = False,
                    crop_seed: int = 0) -> list[int]:
    """The ``time_ids`` of an image of ``original`` (h, w) cut by ``transform`` to ``target`` (h, w) for a crop seed,
    mirrored or not."""
    (h, w), (th, tw) = original, target
    (rw, _), (left, top) = transform.placement((w, h), (th, tw), random.Random(int(crop_seed)))
    if flip:
        left = rw - left - tw
    return [h, w, top, left, th, tw]


class SizeConditions:
    """The ``time_ids`` (b, 6) of a split's images for batch keys, as a per-image array of a `BatchSource`."""

    def __init__(self, split, d, random_crop: bool):
        """``d``: the config's ``data`` section (resolution, crop settings, image column); ``random_crop``: whether
        the batches crop anew each step (as the pixels do)."""
        self.originals = [(h, w) for w, h in image_sizes(split.ds, d.image_column)]
        self.targets = split.sizes
        self.transform = ImageTransform(d.resolution, d.center_crop, random_crop, crop_scale=d.crop_scale)

    def time_ids(self, i: int, flip: bool = False, crop_seed: int = 0) -> list[int]:
        return crop_conditions(self.transform, self.originals[i], self.targets[i], flip, crop_seed)

    def load(self, items: list[int], flips: torch.Tensor, crop_seeds: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.time_ids(int(i), bool(f), int(c))
                             for i, f, c in zip(items, flips.tolist(), crop_seeds.tolist())], dtype=torch.float32)

    def all(self) -> torch.Tensor:
        """(N, 6) of every image unmirrored with crop seed 0 (the validation images')."""
        return self.load(list(range(len(self.originals))), torch.zeros(len(self.originals), dtype=torch.bool),
                         torch.zeros(len(self.originals), dtype=torch.long))


class StreamedSizeConditions:
    """The ``time_ids`` (b, 6) of streamed samples: of each image as this step cuts it (the same transform, size,
    flip and crop seed as its pixels), or as stored beside a precomputed latent (`ldm.precompute`)."""

    def __init__(self, d):
        self.transform = ImageTransform(d.resolution, d.center_crop, d.random_crop, crop_scale=d.crop_scale)

    def load_rows(self, rows: list, size: tuple[int, int], flips: list, crop_seeds: list) -> torch.Tensor:
        """``rows``: [(image or `ldm.data.stream.Latent`, caption)] cut to ``size`` (h, w)."""
        out = []
        for (image, _), flip, seed in zip(rows, flips, crop_seeds):
            if hasattr(image, "time_ids"):  # a precomputed latent
                if image.time_ids is None:
                    raise ValueError("these latent shards hold no size conditions (time_ids): precompute them again "
                                     "with python -m ldm.precompute")
                out.append(image.time_ids)
            else:
                out.append(crop_conditions(self.transform, (image.height, image.width), size, bool(flip), int(seed)))
        return torch.tensor(out, dtype=torch.float32)
