"""Images as tensors: `to_rgb` reads any mode as the file shows it, `ImageTransform` resizes, crops and
mirrors to a (height, width) in [-1, 1], `ImageCaptionDataset` pairs the result with a caption, and
`downsample` area-averages to a lower resolution."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.data.sources import captions_of



logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Image transform
# ----------------------------------------------------------------------------------------------

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An RGB image that means what the file shows.

    16-bit greyscale is scaled to 8 bits (PIL's ``convert("RGB")`` clips it, so mid-grey would become white);
    32-bit integer greyscale likewise when its values exceed 255, and float greyscale is read as [0, 1].
    Transparency (RGBA, LA, PA, or a palette or colour marked transparent) is composited over ``background``
    instead of turning black or keeping the hidden colour.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0
        elif image.mode in _SIXTEEN_BIT_MODES or arr.max() > 255:
            top = 65535.0
        else:
            top = 255.0
        image = Image.fromarray(np.clip(np.round(arr / top * 255), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def to_mask(image: Image.Image) -> Image.Image:
    """An 8-bit greyscale mask that means what the file shows: 16-bit and float greyscale scaled as `to_rgb` scales
    them, transparent pixels black (not painted)."""
    return to_rgb(image, background=(0, 0, 0)).convert("L")


def open_image(path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The image file at ``path`` as training reads it (`to_rgb`: 16-bit, transparency, palettes, CMYK)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image, background)


def open_mask(path) -> Image.Image:
    """The mask file at ``path`` as training reads it (`to_mask`)."""
    with Image.open(path) as image:
        image.load()
        return to_mask(image)


class ImageTransform:
    """Resize an image to cover a (height, width) target, crop it, maybe mirror it, map it to [-1, 1].

    Any image mode is read as `to_rgb` says (transparency over ``background``). The crop is random when
    ``random_crop`` (it wins over ``center_crop``), centred when ``center_crop``, else the top-left corner; with
    ``crop_scale`` > 1 the image is resized to cover that multiple of the target first, so every crop cuts. A random crop's offset comes from the ``rng`` passed to each call (the `random`
    module when None), so a seeded rng gives the same output; the caller decides the flip.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_crop: bool = False,
                 background: Sequence[int] = (255, 255, 255), crop_scale: float = 1.0):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if not crop_scale >= 1:
            raise ValueError(f"crop_scale must be >= 1 (the resized image covers that multiple of the target), got "
                             f"{crop_scale}")
        self.resolution, self.center_crop = resolution, center_crop
        self.random_crop, self.background, self.crop_scale = random_crop, tuple(background), crop_scale

    def __call__(self, image: Image.Image, size: tuple[int, int] | None = None, rng: random.Random | None = None,
                 flip: bool = False) -> torch.Tensor:
        """Return (3, height, width) float32 in [-1, 1], mirrored when ``flip``."""
        th, tw = size if size is not None else (self.resolution, self.resolution)
        if th <= 0 or tw <= 0:
            raise ValueError(f"size must be a positive (height, width), got {size}")
        image = to_rgb(image, self.background)
        resized, (left, top) = self.placement(image.size, (th, tw), rng)
        if resized != image.size:  # scale so both sides cover the target, then crop the excess
            image = image.resize(resized, Image.Resampling.BICUBIC)
        image = image.crop((left, top, left + tw, top + th))
        if flip:
            image = ImageOps.mirror(image)
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)

    def placement(self, image_size: tuple[int, int], target: tuple[int, int], rng: random.Random | None = None):
        """Where an image of ``image_size`` (w, h) lands for a ``target`` (h, w): (its resized (w, h), the crop's
        (left, top) in the resized image), the crop drawn from ``rng`` when random."""
        (w, h), (th, tw) = image_size, target
        resized = (w, h)
        if (w, h) != (tw, th) or self.crop_scale != 1:
            scale = max(tw / w, th / h) * self.crop_scale
            resized = (max(tw, round(w * scale)), max(th, round(h * scale)))
        return resized, self._crop_offset(resized, target, rng if rng is not None else random)

    def _crop_offset(self, image_size: tuple[int, int], target: tuple[int, int], rng) -> tuple[int, int]:
        (w, h), (th, tw) = image_size, target
        if self.random_crop:
            return rng.randint(0, w - tw), rng.randint(0, h - th)
        if self.center_crop:
            return (w - tw) // 2, (h - th) // 2
        return 0, 0


# ----------------------------------------------------------------------------------------------
# Torch dataset
# ----------------------------------------------------------------------------------------------

class ImageCaptionDataset(torch.utils.data.Dataset):
    """Lazily transformed (image tensor, caption) pairs over a `datasets.Dataset`, square at ``resolution``.

    Items hold "pixel_values" (3, H, W) and "caption" (the first caption when a row holds several), so
    torch's default collate batches them whatever the caption column holds.
    """

    def __init__(self, ds, resolution: int, image_column: str = "image", caption_column: str = "text",
                 center_crop: bool = True, background: Sequence[int] = (255, 255, 255)):
        self.ds, self.transform = ds, ImageTransform(resolution, center_crop, background=background)
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[int(i)]
        return {"pixel_values": self.transform(row[self.image_column]),
                "caption": captions_of(row[self.caption_column])[0]}


def downsample(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """Area average over ``factor`` x ``factor`` blocks: (B, C, H, W) -> (B, C, H / factor, W / factor)."""
    return torch.nn.functional.avg_pool2d(pixels, factor) if factor > 1 else pixels
