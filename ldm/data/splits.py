"""The diffusion trainer's data: the training, validation and DreamBooth class splits, read through
`ldm.data.load_source`, with their captions flattened and their images assigned to aspect buckets."""

from __future__ import annotations

import logging
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.data.builtin import BUILTIN_DATASETS
from ldm.data.cache import Fingerprint
from ldm.data.sources import (
    REPEATS_COLUMN,
    captions_of,
    drop_bad_images,
    image_sizes,
    instance_dataset,
    load_source,
)
from ldm.data.buckets import make_buckets, nearest_bucket

logger = logging.getLogger(__name__)


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
    bad: list = field(default_factory=list)  # images skipped because they cannot be decoded
    repeats: np.ndarray | None = None  # (N,) times each image comes an epoch on average (None: once)
    sources: np.ndarray | None = None  # (N,) the data.sources entry of each image (None: one source)

    def __len__(self) -> int:
        return len(self.ds)

    def first_captions(self) -> list[str]:
        return [self.captions[s] for s in self.caption_start[:-1]]

    def caption_index(self, items: list[int], u: torch.Tensor) -> torch.Tensor:
        """Index into ``captions`` of one caption per item, drawn by ``u`` ~ U[0, 1) (B,)."""
        items = np.asarray(items)
        lo, hi = self.caption_start[items], self.caption_start[items + 1]
        return torch.from_numpy(lo + np.minimum((u.numpy() * (hi - lo)).astype(np.int64), hi - lo - 1))

    def unseen_buckets(self, batch_size: int) -> dict[str, int]:
        """Buckets with fewer images than a batch, "HxW" -> images: batches never mix buckets, so these images
        are never trained on."""
        if self.groups is None:
            return {}
        counts = np.bincount(self.groups, minlength=len(self.buckets))
        return {f"{h}x{w}": int(n) for (h, w), n in zip(self.buckets, counts) if 0 < n < batch_size}


def _load(cfg, source: str, split: str, bad: list | None = None):
    d = cfg.data
    return load_source(source, split=split, data_root=d.data_root, resolution=d.resolution,
                       image_column=d.image_column, caption_column=d.caption_column,
                       max_bad_fraction=d.max_bad_fraction, bad=bad, caption_extension=d.caption_extension)


SOURCE_COLUMN = "_source"  # the index in data.sources of each image's source


def _load_sources(cfg, bad: list, regularisation: bool = False) -> datasets.Dataset:
    """The images of every ``data.sources`` entry (its regularisation entries with ``regularisation``) in one table,
    with each image's repeats an epoch (the entry's repeats, or its weight's share of all places, times its
    folder's ``N_name`` repeats) and its entry's index."""
    import datasets

    d, parts = cfg.data, []
    for k, entry in enumerate(d.sources):
        if entry.regularisation != regularisation:
            continue
        ds = load_source(entry.dataset, split=d.split, data_root=d.data_root, resolution=d.resolution,
                         image_column=d.image_column, caption_column=d.caption_column,
                         max_bad_fraction=d.max_bad_fraction, bad=bad,
                         caption_extension=entry.caption_extension or d.caption_extension)
        base = np.asarray(ds[REPEATS_COLUMN], dtype=np.float64) if REPEATS_COLUMN in ds.column_names \
            else np.ones(len(ds))
        ds = ds.select_columns([d.image_column, d.caption_column])
        if isinstance(ds.features[d.caption_column], datasets.Value):  # one caption type for every source
            ds = ds.map(lambda row: {d.caption_column: [row[d.caption_column]]},
                        features=datasets.Features({**ds.features, d.caption_column: [datasets.Value("string")]}))
        parts.append((k, entry, ds, base))
    total, weights = sum(len(ds) for _, _, ds, _ in parts), [e.weight for _, e, _, _ in parts]
    out = []
    for k, entry, ds, base in parts:
        if weights[0] is not None:  # the entry's share of all places, spread over its images as their repeats say
            base = base * (entry.weight / sum(weights)) * total / base.sum()
        else:
            base = base * entry.repeats
        out.append(ds.add_column(REPEATS_COLUMN, base.tolist()).add_column(SOURCE_COLUMN, [k] * len(ds)))
    return datasets.concatenate_datasets(out)


def load_splits(cfg) -> tuple[Split, Split, bool]:
    """(training split, validation split, whether the validation images are held out of training).

    Validation images come from ``data.validation_dataset``, a built-in dataset's held-out split, or a
    ``data.validation_fraction`` of the training source; without any, a fixed subset of the training images
    stands in (the summary says so). At most ``data.validation_num_images`` are used, drawn once with a fixed
    seed. DreamBooth trains on ``dreambooth.instance_data`` under its prompt and validates on those images.
    """
    d = cfg.data
    source, bad_train, bad_val = d.dataset, [], []
    if cfg.dreambooth.instance_data:
        source = cfg.dreambooth.instance_data
        train_ds = instance_dataset(source, cfg.dreambooth.instance_prompt, d.image_column, d.caption_column)
        train_ds = drop_bad_images(train_ds, d.image_column, source, d.max_bad_fraction, bad_train)
    elif d.sources:
        source = "+".join(entry.dataset for entry in d.sources)
        train_ds = _load_sources(cfg, bad_train)
    else:
        train_ds = _load(cfg, d.dataset, d.split, bad_train)
    val_ds, heldout = None, True
    if cfg.dreambooth.instance_data:
        pass  # a handful of subject images: validate on them
    elif d.validation_dataset:
        val_ds = _load(cfg, d.validation_dataset, d.validation_split_name, bad_val)
    elif d.dataset in BUILTIN_DATASETS and not d.sources:
        val_ds = _load(cfg, d.dataset, "heldout", bad_val)
    elif d.validation_fraction > 0:
        parts = train_ds.train_test_split(test_size=d.validation_fraction, seed=cfg.train.seed, shuffle=True)
        train_ds, val_ds = parts["train"], parts["test"]
        if len(val_ds) < cfg.train.batch_size:
            logger.warning("data.validation_fraction=%g of %d images holds out %d, fewer than a batch "
                           "(train.batch_size=%d): the validation loss moves with which images they happen to be; "
                           "raise the fraction, or give data.validation_dataset", d.validation_fraction,
                           len(train_ds) + len(val_ds), len(val_ds), cfg.train.batch_size)
    if val_ds is None:
        val_ds, heldout = train_ds, False
    if d.max_train_samples is not None and len(train_ds) > d.max_train_samples and not cfg.dreambooth.instance_data:
        train_ds = train_ds.shuffle(seed=cfg.train.seed).select(range(d.max_train_samples))
    if len(val_ds) > d.validation_num_images:
        val_ds = val_ds.shuffle(seed=0).select(range(d.validation_num_images))
    files = [entry.dataset for entry in d.sources] if d.sources and not cfg.dreambooth.instance_data else None
    train = make_split(cfg, train_ds, source, bucketing=d.bucketing, files=files)
    val = make_split(cfg, val_ds, d.validation_dataset or source, bucketing=False,
                     files=None if d.validation_dataset else files)
    train.bad, val.bad = bad_train, bad_val
    return train, val, heldout


@dataclass
class StreamData:
    """What set-up reads of streamed shards (`stream_splits`)."""

    first: Split  # the first samples, standing in for the training data at set-up (tokenizer, grid prompts)
    val: Split
    exclude: frozenset  # keys ("shard#key") held out of the stream for validation
    shards: list
    bad: list  # the first samples' skipped ones
    val_latents: tuple | None = None  # (mean, std) (V, C, h, w) when the shards hold precomputed latents
    vae: str | None = None  # the encoder fingerprint precomputed latents were made with
    latent_size: tuple | None = None  # (h, w) of precomputed latents
    text: str | None = None  # the fingerprint of the text encoder whose embeddings precomputed latents carry
    val_arrays: dict | None = None  # per-image arrays of precomputed validation samples: "time_ids" (V, 6)


def stream_splits(cfg, head_size: int = 256) -> StreamData:
    """Splits for a run on streamed shards (images, or latents from `ldm.precompute`). Validation images come
    from ``data.validation_dataset``, else the first ``data.validation_num_images`` samples of the shards, which
    training then skips."""
    import datasets

    from ldm.data.stream import Latent, expand_shards, stream_head

    d = cfg.data
    shards = expand_shards(d.dataset)
    n_val = 0 if d.validation_dataset else d.validation_num_images
    head, report = stream_head(shards, max(n_val, head_size), d.min_image_size)
    if len(head) <= n_val:
        raise ValueError(f"data.dataset={d.dataset!r}: only {len(head)} usable sample(s) found while holding out "
                         f"data.validation_num_images={n_val} for validation; lower it or give data.validation_dataset")
    latent = isinstance(head[0][1], Latent)
    for key, on in (("data.random_flip", d.random_flip), ("data.bucketing", d.bucketing)):
        if latent and on:  # precomputed latents are cut once, square, unflipped
            raise ValueError(f"{key}=true cannot be applied to the precomputed (square, unflipped) latents of "
                             f"data.dataset={d.dataset!r}; set it to false")
    columns = {d.caption_column: [c for _, _, c in head]}
    if not latent:
        columns[d.image_column] = [im for _, im, _ in head]
    features = {d.caption_column: datasets.Value("string"), **({} if latent else {d.image_column: datasets.Image()})}
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    ds._fingerprint = Fingerprint().value([key for key, _, _ in head]).hexdigest()  # the same on every process
    out = StreamData(make_split(cfg, ds, f"{d.dataset}#head", bucketing=d.bucketing), None, frozenset(), shards,
                     report.bad_examples, vae=head[0][1].vae if latent else None,
                     latent_size=tuple(head[0][1].mean.shape[-2:]) if latent else None,
                     text=head[0][1].text if latent else None)
    if d.validation_dataset:
        out.val = make_split(cfg, _load(cfg, d.validation_dataset, d.validation_split_name), d.validation_dataset,
                             False)
        return out
    held = ds.select(range(n_val))
    held._fingerprint = Fingerprint().value([key for key, _, _ in head[:n_val]]).hexdigest()
    out.val, out.exclude = make_split(cfg, held, f"{d.dataset}#validation", bucketing=False), frozenset(
        key for key, _, _ in head[:n_val])
    if latent:
        out.val_latents = (torch.stack([x.mean for _, x, _ in head[:n_val]]),
                           torch.stack([x.std for _, x, _ in head[:n_val]]))
        if all(x.time_ids is not None for _, x, _ in head[:n_val]):
            out.val_arrays = {"time_ids": torch.tensor([x.time_ids for _, x, _ in head[:n_val]], dtype=torch.float32)}
    return out


def regularisation_split(cfg) -> Split | None:
    """The images of the ``data.sources`` entries marked ``regularisation``, as a split (None without any)."""
    if not any(e.regularisation for e in cfg.data.sources):
        return None
    ds = _load_sources(cfg, [], regularisation=True)
    return make_split(cfg, ds, "+".join(e.dataset for e in cfg.data.sources if e.regularisation),
                      bucketing=cfg.data.bucketing, files=[e.dataset for e in cfg.data.sources if e.regularisation])


def class_split(cfg, folder: Path, prompts: list[str]) -> Split:
    """DreamBooth's class images of ``prompts`` (from an image folder with metadata.jsonl, which may also hold
    other prompts' images) as a split."""
    ds = _load(cfg, str(folder), "train")
    mine = [i for i, text in enumerate(ds[cfg.data.caption_column]) if text in prompts]
    if len(mine) < len(ds):
        ds = ds.select(mine)
    return make_split(cfg, ds, str(folder), bucketing=cfg.data.bucketing)


def make_split(cfg, ds, source: str, bucketing: bool, files: list[str] | None = None) -> Split:
    d = cfg.data
    if len(ds) == 0:
        raise ValueError(f"data source {source!r} has no images")
    captions, start = [], [0]
    for value in ds[d.caption_column]:
        captions += captions_of(value)
        start.append(len(captions))
    # (w, h) from file headers; a stream's first samples of precomputed latents have no images
    stored = image_sizes(ds, d.image_column) if d.image_column in ds.column_names else None
    if bucketing:
        buckets = make_buckets(d.resolution, d.bucket_step, d.bucket_max_ratio)
        groups = [nearest_bucket(w, h, buckets) for w, h in stored]
        sizes = [buckets[g] for g in groups]
        counts = np.bincount(groups, minlength=len(buckets))
        logger.info("aspect buckets (h x w): images %s",
                    {f"{h}x{w}": int(n) for (h, w), n in zip(buckets, counts) if n})
    else:
        buckets, groups, sizes = [(d.resolution, d.resolution)], None, [(d.resolution, d.resolution)] * len(ds)
    if stored is not None:
        report_upscaled(stored, sizes, source)
    fp = Fingerprint().value([source, len(ds), getattr(ds, "_fingerprint", None), d.image_column,
                              d.resolution, d.center_crop, bucketing, d.bucket_step, d.bucket_max_ratio,
                              d.alpha_background] + ([d.crop_scale] if d.crop_scale != 1 else []))
    for path in files if files is not None else [source]:  # a folder's files: a changed image makes a new key
        if Path(path).exists():
            fp.files(path)
    repeats = np.asarray(ds[REPEATS_COLUMN], dtype=np.float64) if REPEATS_COLUMN in ds.column_names else None
    sources = np.asarray(ds[SOURCE_COLUMN], dtype=np.int64) if SOURCE_COLUMN in ds.column_names else None
    return Split(ds, captions, np.asarray(start), sizes, groups, buckets, fp.hexdigest(), repeats=repeats,
                 sources=sources)


def report_upscaled(stored: list[tuple[int, int]], sizes: list[tuple[int, int]], source: str) -> int:
    """Log how many images are smaller than what they train at (and so are enlarged, softer than the rest), with
    the smallest; return the count."""
    small = [(w, h, th, tw) for (w, h), (th, tw) in zip(stored, sizes) if max(tw / w, th / h) > 1]  # cover scale
    if small:
        w, h, th, tw = min(small, key=lambda s: s[0] * s[1])
        logger.warning("%d of %d images of %s are smaller than the size they train at and are enlarged (the smallest "
                       "%dx%d to cover %dx%d); they train softer than the others: lower data.resolution, or leave "
                       "them out", len(small), len(stored), source, w, h, tw, th)
    return len(small)


def check_sizes(cfg, split: Split, vae_factor: int) -> None:
    """Every training size must map to whole latents."""
    d = cfg.data
    if d.bucketing and d.bucket_step % vae_factor:
        raise ValueError(f"data.bucket_step={d.bucket_step} must be a multiple of the VAE's factor {vae_factor}")
    for h, w in split.buckets:
        if h % vae_factor or w % vae_factor:
            raise ValueError(f"image size {h}x{w} (data.resolution={d.resolution}) must be a multiple of the VAE's "
                             f"factor {vae_factor}")


def report_bad_images(bad: list[dict], run_dir: Path, is_main: bool) -> Path | None:
    """Write the skipped images, one JSON object per line, to ``<run>/bad_images.jsonl``; return its path."""
    if not bad:
        return None
    path = Path(run_dir) / "bad_images.jsonl"
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(b) + "\n" for b in bad))
    return path


def report_unseen(split: Split, batch_size: int) -> dict[str, int]:
    """Log the buckets too small for one batch; return them ("HxW" -> images) for the summary."""
    unseen = split.unseen_buckets(batch_size)
    if unseen:
        logger.warning("%d images are never trained on: their aspect buckets hold fewer than train.batch_size=%d "
                       "images (bucket: images) %s; lower the batch size or data.bucket_max_ratio, or raise "
                       "data.bucket_step", sum(unseen.values()), batch_size, unseen)
    return unseen
