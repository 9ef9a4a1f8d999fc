"""The autoencoder's images: one or more sources (built-in names, folders, parquet, ...) as square tensors."""

from __future__ import annotations

import logging

import torch

from ldm.data.builtin import BUILTIN_DATASETS
from ldm.data.images import ImageCaptionDataset
from ldm.data.sources import load_source

logger = logging.getLogger(__name__)


def load_images(name: str, data_cfg, split: str, bad: list | None = None) -> ImageCaptionDataset:
    """One source's images (any source `ldm.data.load_source` reads). Only the built-in datasets have a
    held-out split; for other sources the held-out numbers are measured on their training images."""
    if split != "train" and name not in BUILTIN_DATASETS:
        logger.warning("%s has no %r split: its held-out numbers are measured on its training images", name, split)
        split = "train"
    ds = load_source(name, split=split, data_root=data_cfg.data_root, resolution=data_cfg.resolution,
                     image_column=data_cfg.image_column, caption_column=data_cfg.caption_column,
                     max_bad_fraction=data_cfg.max_bad_fraction, bad=bad)
    return ImageCaptionDataset(ds, data_cfg.resolution, data_cfg.image_column, data_cfg.caption_column,
                               data_cfg.center_crop, data_cfg.alpha_background)


def image_datasets(data_cfg, split: str, bad: list | None = None) -> torch.utils.data.ConcatDataset:
    """All sources' images; undecodable ones are skipped and appended to ``bad``."""
    return torch.utils.data.ConcatDataset([load_images(name, data_cfg, split, bad) for name in data_cfg.datasets])
