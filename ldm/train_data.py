"""The diffusion trainer's data side: sources, captions, buckets, the latent and text caches, and how
one step's global batch becomes the tensors each process trains on.

Data order and augmentation are pure functions of (seed, step): the global batch of a step (one bucket)
and its per-image choices (caption, flip, crop) are the same on any number of processes and after a
resume. Each process takes its slice of every micro-batch.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .builtin_data import BUILTIN_DATASETS
from .cache import ArrayWriter, Fingerprint, build_or_open, take
from .checkpoint import step_seed
from .config import LDMConfig
from .data import (GlobalBatchSampler, ImageTransform, captions_of, image_sizes, load_source, make_buckets,
                   nearest_bucket)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# 1. Sources and captions
# ----------------------------------------------------------------------------------------------

@dataclass
class Split:
    """One split of image + caption data with what training needs to index it."""

    ds: object  # datasets.Dataset
    captions: list[str]  # every caption of every image, flattened
    caption_start: np.ndarray  # (N + 1,): image i owns captions[caption_start[i]:caption_start[i + 1]]
    sizes: list[tuple[int, int]]  # (h, w) each image is cropped to
    groups: list[int] | None  # bucket of each image (None: one square size)
    buckets: list[tuple[int, int]]
    fingerprint: str  # of the data and its transform, for cache keys

    def __len__(self) -> int:
        return len(self.ds)

    def first_captions(self) -> list[str]:
        return [self.captions[s] for s in self.caption_start[:-1]]


def _load(cfg: LDMConfig, source: str, split: str):
    d = cfg.data
    return load_source(source, split=split, data_root=d.data_root, resolution=d.resolution,
                       image_column=d.image_column, caption_column=d.caption_column)


def load_splits(cfg: LDMConfig) -> tuple[Split, Split, bool]:
    """(training split, validation split, whether the validation images are held out of training).

    Validation images come from ``data.validation_dataset``, a built-in dataset's held-out split, or a
    ``data.validation_fraction`` of the training source; without any, a fixed subset of the training
    images stands in (the summary says so). At most ``data.validation_num_images`` are used, drawn
    once with a fixed seed.
    """
    d = cfg.data
    source = d.dataset
    if cfg.dreambooth.instance_data:  # DreamBooth: the subject's images, all under the instance prompt
        from .dreambooth import instance_dataset

        source = cfg.dreambooth.instance_data
        train_ds = instance_dataset(source, cfg.dreambooth.instance_prompt, d.image_column, d.caption_column)
    else:
        train_ds = _load(cfg, d.dataset, d.split)
    val_ds, heldout = None, True
    if cfg.dreambooth.instance_data:
        pass  # a handful of subject images: validate on them
    elif d.validation_dataset:
        val_ds = _load(cfg, d.validation_dataset, d.validation_split_name)
    elif d.dataset in BUILTIN_DATASETS:
        val_ds = _load(cfg, d.dataset, "heldout")
    elif d.validation_fraction > 0:
        if not 0 < d.validation_fraction < 1:
            raise ValueError(f"data.validation_fraction={d.validation_fraction} must be in (0, 1)")
        parts = train_ds.train_test_split(test_size=d.validation_fraction, seed=cfg.train.seed, shuffle=True)
        train_ds, val_ds = parts["train"], parts["test"]
    if val_ds is None:
        val_ds, heldout = train_ds, False
    if len(val_ds) > d.validation_num_images:
        val_ds = val_ds.shuffle(seed=0).select(range(d.validation_num_images))
    train = make_split(cfg, train_ds, source, bucketing=d.bucketing)
    val = make_split(cfg, val_ds, d.validation_dataset or source, bucketing=False)
    return train, val, heldout


def class_split(cfg: LDMConfig, folder: Path) -> Split:
    """DreamBooth's class images (an image folder with metadata.jsonl) as a split."""
    return make_split(cfg, _load(cfg, str(folder), "train"), str(folder), bucketing=cfg.data.bucketing)


def make_split(cfg: LDMConfig, ds, source: str, bucketing: bool) -> Split:
    d = cfg.data
    if len(ds) == 0:
        raise ValueError(f"data source {source!r} has no images")
    captions, start = [], [0]
    for value in ds[d.caption_column]:
        captions += captions_of(value)
        start.append(len(captions))
    if bucketing:
        buckets = make_buckets(d.resolution, d.bucket_step, d.bucket_max_ratio)
        groups = [nearest_bucket(w, h, buckets) for w, h in image_sizes(ds, d.image_column)]
        sizes = [buckets[g] for g in groups]
        counts = np.bincount(groups, minlength=len(buckets))
        logger.info("aspect buckets (h x w): images %s",
                    {f"{h}x{w}": int(n) for (h, w), n in zip(buckets, counts) if n})
    else:
        buckets, groups, sizes = [(d.resolution, d.resolution)], None, [(d.resolution, d.resolution)] * len(ds)
    fp = Fingerprint().value([source, len(ds), getattr(ds, "_fingerprint", None), d.image_column,
                              d.resolution, d.center_crop, bucketing, d.bucket_step, d.bucket_max_ratio])
    if Path(source).exists():
        fp.files(source)
    return Split(ds, captions, np.asarray(start), sizes, groups, buckets, fp.hexdigest())


def check_sizes(cfg: LDMConfig, split: Split, vae_factor: int) -> None:
    """Every training size must map to whole latents."""
    d = cfg.data
    if d.bucketing and d.bucket_step % vae_factor:
        raise ValueError(f"data.bucket_step={d.bucket_step} must be a multiple of the VAE's factor {vae_factor}")
    for h, w in split.buckets:
        if h % vae_factor or w % vae_factor:
            raise ValueError(f"image size {h}x{w} (data.resolution={d.resolution}) must be a multiple of the VAE's "
                             f"factor {vae_factor}")


def caption_index(split: Split, items: list[int], u: torch.Tensor) -> torch.Tensor:
    """Index into split.captions of one caption per item, drawn by ``u`` ~ U[0, 1) (B,)."""
    items = np.asarray(items)
    lo, hi = split.caption_start[items], split.caption_start[items + 1]
    return torch.from_numpy(lo + np.minimum((u.numpy() * (hi - lo)).astype(np.int64), hi - lo - 1))


# ----------------------------------------------------------------------------------------------
# 2. Per-step choices: the same on every process and after a resume
# ----------------------------------------------------------------------------------------------

def step_augment(seed: int, step: int, n: int, stream: int = 1) -> dict:
    """Per-image choices for the global batch of ``step``: caption draw, flip, crop seed."""
    g = torch.Generator().manual_seed(step_seed(seed, step, stream))
    return {"caption_u": torch.rand(n, generator=g), "flip": torch.rand(n, generator=g) < 0.5,
            "crop_seed": torch.randint(0, 2**31 - 1, (n,), generator=g)}


# ----------------------------------------------------------------------------------------------
# 3. Latent cache: VAE posterior (mean, std) of every image, per bucket, both orientations if flipping
# ----------------------------------------------------------------------------------------------

class PixelItems(torch.utils.data.Dataset):
    """Images for keys (index, flip, crop_seed), transformed to their bucket's size; the key decides the
    flip, and the crop when ``random_crop``."""

    def __init__(self, split: Split, cfg: LDMConfig, random_crop: bool):
        self.split, self.column = split, cfg.data.image_column
        self.transform = ImageTransform(cfg.data.resolution, cfg.data.center_crop, random_crop)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key) -> torch.Tensor:
        i, flip, crop_seed = key
        image = self.split.ds[int(i)][self.column]
        return self.transform(image, size=self.split.sizes[int(i)], rng=random.Random(int(crop_seed)),
                              flip=bool(flip))


def vae_fingerprint(vae) -> str:
    return Fingerprint().tensors(vae.state_dict()).hexdigest()


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def latent_cache(vae, vae_fp: str, split: Split, cfg: LDMConfig, accelerator, flips: bool,
                 num_items: int | None = None, batch_size: int = 32) -> dict:
    """Open (building once) the posterior cache of the first ``num_items`` images of ``split``."""
    n = len(split) if num_items is None else min(num_items, len(split))
    groups = np.zeros(n, dtype=np.int64) if split.groups is None else np.asarray(split.groups[:n])
    key = Fingerprint().value([vae_fp, split.fingerprint, n, flips, "v2"]).hexdigest()
    items = PixelItems(split, cfg, random_crop=False)  # cached crops are the deterministic ones

    def build(folder: Path) -> dict:
        rows = np.zeros(n, dtype=np.int64)
        shapes = {}
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        c = vae.config.latent_channels
        for b, (h, w) in enumerate(split.buckets):
            members = np.flatnonzero(groups == b)
            rows[members] = np.arange(len(members))
            if len(members):
                for kind in ("mean", "std"):
                    for suffix in (("", "_flip") if flips else ("",)):
                        shapes[f"{kind}{suffix}_{b}"] = (len(members), c, h // f, w // f)
        writer = ArrayWriter(folder, shapes)
        from tqdm.auto import tqdm

        bar = tqdm(total=n * (2 if flips else 1), desc="caching latents",
                   disable=not accelerator.is_local_main_process)
        for b in range(len(split.buckets)):
            members = np.flatnonzero(groups == b)
            for suffix, flip in (("", False), ("_flip", True)) if flips else (("", False),):
                keys = [[(int(i), flip, 0) for i in members[s:s + batch_size]]
                        for s in range(0, len(members), batch_size)]
                loader = torch.utils.data.DataLoader(items, batch_sampler=keys, num_workers=cfg.train.num_workers)
                done = 0
                for pixels in loader:
                    mean, std = encode(vae, pixels)
                    sl = slice(done, done + len(pixels))
                    writer.write(f"mean{suffix}_{b}", sl, mean)
                    writer.write(f"std{suffix}_{b}", sl, std)
                    done += len(pixels)
                    bar.update(len(pixels))
        bar.close()
        writer.close()
        np.save(folder / "rows.npy", rows)
        np.save(folder / "groups.npy", groups)
        return {"num_items": n, "flips": flips, "buckets": split.buckets}

    arrays, _ = build_or_open(cfg.data.cache_dir, key, build, accelerator, "latent cache")
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


# ----------------------------------------------------------------------------------------------
# 4. Text-embedding cache (frozen text encoder)
# ----------------------------------------------------------------------------------------------

def text_cache(text_encoder, input_ids: torch.Tensor, empty_ids: torch.Tensor, cfg: LDMConfig,
               accelerator, batch_size: int = 256) -> dict:
    """Hidden states (n, L, D) of every caption and of the empty caption, computed once."""
    key = "text-" + Fingerprint().tensors(text_encoder.state_dict()).value(
        [list(input_ids.shape), empty_ids.tolist()]).raw(input_ids.numpy().tobytes()).hexdigest()

    @torch.no_grad()
    def build(folder: Path) -> dict:
        device = accelerator.device
        te = text_encoder.to(device).eval()
        dim = te.config.hidden_size
        writer = ArrayWriter(folder, {"embeds": (len(input_ids), input_ids.shape[1], dim),
                                      "empty": (1, input_ids.shape[1], dim)})
        for s in range(0, len(input_ids), batch_size):
            writer.write("embeds", slice(s, s + batch_size), te(input_ids[s:s + batch_size].to(device))[0])
        writer.write("empty", slice(0, 1), te(empty_ids[None].to(device))[0])
        writer.close()
        return {"num_captions": len(input_ids)}

    arrays, _ = build_or_open(cfg.data.cache_dir, key, build, accelerator, "text-embedding cache")
    return arrays


def batch_at(sampler: GlobalBatchSampler, step: int) -> list[int]:
    """The global batch a sampler gives at ``step`` (epochs follow one another)."""
    return sampler.batches(step // len(sampler))[step % len(sampler)]


def batch_plan(split: Split, cfg: LDMConfig) -> GlobalBatchSampler:
    return GlobalBatchSampler(split.groups, len(split), cfg.train.batch_size, cfg.train.seed, drop_last=True)
