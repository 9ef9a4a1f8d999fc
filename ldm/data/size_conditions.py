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


class SizeConditions:
    """The ``time_ids`` (b, 6) of a split's images for batch keys, as a per-image array of a `BatchSource`."""

    def __init__(self, split, d, random_crop: bool):
        """``d``: the config's ``data`` section (resolution, crop settings, image column); ``random_crop``: whether
        the batches crop anew each step (as the pixels do)."""
        self.originals = [(h, w) for w, h in image_sizes(split.ds, d.image_column)]
        self.targets = split.sizes
        self.transform = ImageTransform(d.resolution, d.center_crop, random_crop, crop_scale=d.crop_scale)

    def time_ids(self, i: int, flip: bool = False, crop_seed: int = 0) -> list[int]:
        (h, w), (th, tw) = self.originals[i], self.targets[i]
        (rw, _), (left, top) = self.transform.placement((w, h), (th, tw), random.Random(int(crop_seed)))
        if flip:
            left = rw - left - tw
        return [h, w, top, left, th, tw]

    def load(self, items: list[int], flips: torch.Tensor, crop_seeds: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.time_ids(int(i), bool(f), int(c))
                             for i, f, c in zip(items, flips.tolist(), crop_seeds.tolist())], dtype=torch.float32)

    def all(self) -> torch.Tensor:
        """(N, 6) of every image unmirrored with crop seed 0 (the validation images')."""
        return self.load(list(range(len(self.originals))), torch.zeros(len(self.originals), dtype=torch.bool),
                         torch.zeros(len(self.originals), dtype=torch.long))
