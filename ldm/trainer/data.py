"""Where a run's training images come from, behind one interface (`DataSource`), named in `DATA_SOURCES`.

A data source refuses settings it cannot serve (``check``), reads the splits at set-up (``read`` -> `RunData`) and
makes the training batch source (``batches``) that the step function asks for each step's global batch:

- ``table``: a map-style `datasets` table (an image folder with ``metadata.jsonl``, a hub dataset saved to disk, a
  built-in dataset): every image is listed and checked before step 0, its latents and the frozen text encoder's
  outputs are cached, and a step's batch is a pure function of (seed, step) (`ldm.data.batches.BatchSource`).
- ``shards``: webdataset shards streamed (`ldm.data.stream`), of images or of latents precomputed by
  `ldm.precompute`: nothing is listed first, each process reads its own shards, and the stream's position is
  checkpointed (`ldm.data.stream.StreamSource`).

The trainer asks the run's source (`data_source_for`) and never tests which one it has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ldm.data.batches import (
    TRAIN_STREAMS,
    BatchSource,
    CachedArrays,
    CutArrays,
    GlobalBatchSampler,
    PixelItems,
    micro_batch_size,
)
from ldm.data.cache import Encoding, latent_cache
from ldm.data.splits import (
    Split,
    load_splits,
    regularisation_split,
    report_bad_images,
    report_unseen,
    stream_splits,
)
from ldm.data.tags import TagRules
from ldm.models.vae import encode, encoder_fingerprint
from ldm.trainer.stage import cache_place
from pipelines.latents import vae_scale_factor

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """The run's splits and what reading them found."""

    train: Split  # streamed: the first samples, standing in for the data at set-up (tokenizer, grid prompts)
    val: Split
    heldout: bool  # whether the validation images are held out of training
    unseen: dict  # buckets too small for a batch: "HxW" -> images never trained on
    bad: list  # images skipped: they cannot be decoded
    bad_report: Path | None  # the file naming them
    val_latents: tuple | None = None  # (mean, std) of the validation images when precomputed (no images to encode)
    val_arrays: dict | None = None  # and their per-image arrays (SDXL's "time_ids"), in place of the stage's
    state: object = None  # what the data source keeps from ``read`` for ``batches``
    regularisation: Split | None = None  # images mixed into every step as DreamBooth's class images are


class DataSource:
    """One kind of training data (see the module docstring)."""

    def fixed_captions(self, cfg) -> bool:
        """Whether every caption is known at set-up, so that a frozen text encoder's outputs can be cached."""
        return True

    def matches(self, cfg) -> bool:
        raise NotImplementedError

    def check(self, c) -> None:
        """Refuse, through the config `Checker` ``c``, the settings this source cannot serve."""

    def read(self, cfg, engine, method) -> RunData:
        raise NotImplementedError

    def batches(self, cfg, engine, stage, comp, data: RunData):
        """The training batch source: ``iterate(start, stop)``, ``plan(step, batch)``, ``load(plan, slice)``,
        ``summary()``."""
        raise NotImplementedError


class TableData(DataSource):
    """A map-style `datasets` table, cached (see the module docstring)."""

    def matches(self, cfg) -> bool:
        return True

    def fixed_captions(self, cfg) -> bool:
        return not any(rule.active for rule in tag_rules(cfg.data))

    def read(self, cfg, engine, method) -> RunData:
        """The training and validation splits (built-in data is generated once, by the main process), checked by
        the method, with the images skipped because they cannot be decoded written to ``<run>/bad_images.jsonl``."""
        acc = engine.accelerator
        with acc.main_process_first():
            train_split, val_split, heldout = load_splits(cfg)
            regularisation = regularisation_split(cfg)
        method.check_captions(cfg, train_split.captions)
        bad = train_split.bad + val_split.bad
        return RunData(train_split, val_split, heldout, report_unseen(train_split, cfg.train.batch_size), bad,
                       report_bad_images(bad, cfg.run_dir, acc.is_main_process), regularisation=regularisation)

    def batches(self, cfg, engine, stage, comp, data: RunData):
        return batch_source(cfg, engine, stage, comp, data.train, TRAIN_STREAMS,
                            masked=cfg.data.mask_source != "none", tags=tag_rules(cfg.data))


class ShardData(DataSource):
    """Webdataset shards of images or precomputed latents, streamed (see the module docstring)."""

    def fixed_captions(self, cfg) -> bool:
        return False  # streamed captions are encoded every step: there is no fixed set to cache

    def matches(self, cfg) -> bool:
        from ldm.data.stream import is_shard_spec

        return not cfg.data.sources and is_shard_spec(cfg.data.dataset)

    def check(self, c) -> None:
        d = c.cfg.data
        for key, on in (("data.mask_source", d.mask_source != "none"), ("data.shuffle_tags", d.shuffle_tags),
                        ("data.tag_dropout", d.tag_dropout > 0),
                        ("dreambooth.instance_data", bool(c.cfg.dreambooth.instance_data))):
            c.require(not on, key, f"is not supported with streamed shards (data.dataset={d.dataset!r}) yet")

    def read(self, cfg, engine, method) -> RunData:
        """The first samples stand in for the data at set-up; validation holds out the next ones, or reads
        ``data.validation_dataset`` (`ldm.data.splits.stream_splits`)."""
        s = stream_splits(cfg)
        method.check_captions(cfg, s.first.captions)
        return RunData(s.first, s.val, True, {}, s.bad,
                       report_bad_images(s.bad, cfg.run_dir, engine.accelerator.is_main_process), s.val_latents,
                       s.val_arrays, s)

    def batches(self, cfg, engine, stage, comp, data: RunData):
        """Batches streamed from the run's shards, each step's images cut and encoded anew (or their precomputed
        latents read); the stream's position is checkpointed with the run."""
        from ldm.data.images import ImageTransform
        from ldm.data.stream import StreamSource

        if not stage.streams:
            raise ValueError(f"streamed shards (data.dataset={cfg.data.dataset!r}) train Stable Diffusion 1.x/2.x-"
                             f"style text-to-image models for now, not this model's stage ({type(stage).__name__})")
        d, tc, acc, s = cfg.data, cfg.train, engine.accelerator, data.state
        check_precomputed(d, comp.vae, s.vae, s.latent_size)
        contexts = precomputed_text(d, comp, s.text)
        transform = ImageTransform(d.resolution, d.center_crop, d.random_crop, tuple(d.alpha_background), d.crop_scale)
        source = StreamSource(s.shards, tc.seed, TRAIN_STREAMS, acc,
                              micro_batch_size(tc.batch_size, acc.num_processes, tc.gradient_accumulation_steps),
                              tc.gradient_accumulation_steps, tc.batch_size, transform,
                              lambda captions: stage.tokenize(comp, captions), d.random_flip, d.min_image_size,
                              s.exclude, d.max_bad_fraction, d.shuffle_buffer,
                              buckets=data.train.buckets if d.bucketing else None, contexts=contexts,
                              arrays=stage.stream_arrays())
        engine.state_objects["stream"] = source
        return source


def check_precomputed(d, vae, fingerprint: str | None, size: tuple | None) -> None:
    """Refuse latents precomputed with another VAE encoder (``fingerprint``) or at another resolution (``size``,
    their (h, w)) than the run's."""
    if fingerprint is not None and fingerprint != encoder_fingerprint(vae):
        raise ValueError(f"data.dataset={d.dataset!r} holds latents precomputed with another VAE encoder than this "
                         f"run's; precompute them again with this run's VAE (python -m ldm.precompute)")
    want = (d.resolution // vae_scale_factor(vae),) * 2
    if size is not None and size != want:
        raise ValueError(f"data.dataset={d.dataset!r} holds latents of {size[0]}x{size[1]}, images of "
                         f"{size[0] * vae_scale_factor(vae)} px, but data.resolution={d.resolution} needs "
                         f"{want[0]}x{want[1]}; precompute them at this resolution")


def precomputed_text(d, comp, fingerprint: str | None) -> bool:
    """Whether the text embeddings precomputed into latent shards (made by the encoder of ``fingerprint``) stand in
    for the run's text encoder: only when it is frozen and the same, else it encodes the captions every step."""
    if fingerprint is None:
        return False
    from ldm.models.text import text_fingerprint

    if comp.train_text_encoder:
        logger.info("data.dataset=%r holds text embeddings, but the text encoder trains: it encodes the captions "
                    "every step", d.dataset)
        return False
    if fingerprint != text_fingerprint(comp.text_encoder, comp.tokenizer):
        logger.warning("data.dataset=%r holds text embeddings of another text encoder or tokenizer than this run's: "
                       "they are not used, and the captions are encoded every step", d.dataset)
        return False
    return True


DATA_SOURCES: dict[str, DataSource] = {"shards": ShardData(), "table": TableData()}  # asked in this order


def data_source_for(cfg) -> DataSource:
    """The data source of the run's ``data.dataset``: the first in `DATA_SOURCES` that takes it."""
    return next(source for source in DATA_SOURCES.values() if source.matches(cfg))


def tag_rules(d) -> list[TagRules]:
    """The tag rules of each ``data.sources`` entry (its own settings, else ``data.*``'s), or of ``data.dataset``."""
    def pick(entry, key):
        value = getattr(entry, key) if entry is not None else None
        return getattr(d, key) if value is None else value

    return [TagRules(pick(e, "shuffle_tags"), pick(e, "keep_tokens"), pick(e, "tag_dropout"))
            for e in (d.sources or [None])]


# ----------------------------------------------------------------------------------------------
# A table's batches: cached latents, or pixels cut every step
# ----------------------------------------------------------------------------------------------

def posterior_cache(cfg, engine, comp, split: Split, flips: bool) -> dict:
    """The VAE posterior cache of ``split`` (``flips``: both orientations)."""
    vae = comp.vae
    encoding = Encoding(lambda pixels: encode(vae, pixels), encoder_fingerprint(vae), vae.config.latent_channels,
                        vae_scale_factor(vae))
    return latent_cache(encoding, split, PixelItems.for_split(split, cfg.data), cache_place(cfg, engine), flips)


def batch_source(cfg, engine, stage, comp, split: Split, streams, caption_offset: int = 0, masked: bool = False,
                 tags: list[TagRules] | None = None):
    """The split's batches, read from its latent cache (with the stage's arrays beside) or, when each step crops
    anew, as pixels; with the masked loss's masks when ``masked``, captions changed by ``tags`` every step."""
    d = cfg.data
    texts = {"tags": tags, "tokenize": lambda captions: stage.tokenize(comp, captions)}
    sampler = GlobalBatchSampler(split.groups, len(split), cfg.train.batch_size, cfg.train.seed, drop_last=True,
                                 repeats=split.repeats)
    cached = d.cache_latents and not d.random_crop
    extras = {"mask": mask_arrays(cfg, engine, comp, split, cached)} if masked else {}
    if cached:
        extras.update(stage.arrays(engine, split, d.random_flip))
        return BatchSource(split, sampler, cfg.train.seed, streams, d.random_flip,
                           latents=posterior_cache(cfg, engine, comp, split, d.random_flip),
                           caption_offset=caption_offset, extras=extras, **texts)
    if d.cache_latents:
        logger.info("data.random_crop=true: each step crops anew, so images are encoded every step (no latent cache)")
    extras.update(stage.cut_arrays(engine, split))
    return BatchSource(split, sampler, cfg.train.seed, streams, d.random_flip,
                       pixels=PixelItems.for_split(split, d, d.random_crop), caption_offset=caption_offset,
                       extras=extras, **texts)


def mask_arrays(cfg, engine, comp, split: Split, cached: bool):
    """The masked loss's masks: cached at latent size beside cached latents, else cut each step as the pixels."""
    from ldm.data.masks import MaskItems, mask_cache

    d = cfg.data
    masks = MaskItems(split, d.resolution, d.image_column, d.center_crop, d.random_crop and not cached,
                      d.mask_source, d.mask_column, d.crop_scale)
    if not cached:
        return CutArrays(masks)
    return CachedArrays(mask_cache(masks, split, vae_scale_factor(comp.vae), cache_place(cfg, engine), d.random_flip))
