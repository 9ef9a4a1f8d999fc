"""Streaming webdataset shards: image-caption samples read from ``.tar`` files in order, never listed or unpacked
first, so memory stays flat in the number of shards and samples.

A shard holds samples as files sharing a key (``000123.jpg`` with ``000123.txt`` or ``000123.json``), the layout
img2dataset writes. ``data.dataset`` names shards by a brace pattern (``/data/laion-{000000..009999}.tar``), a
URL pattern (``https://host/laion-{000..099}.tar``; ``s3://`` and other fsspec schemes with their fsspec package
installed) or a folder of ``.tar`` files. The tar format itself is read by webdataset's iterators.

Order is a pure function of (seed, epoch): every epoch permutes the shards, and stream ``s`` of ``S`` (one per
process and data worker) reads every S-th of them, so streams never share a shard and together read each shard
once an epoch; each stream then goes on to its next epoch on its own. A stream's position is a `Cursor`
(epoch, shard in its list, samples taken from that shard), which a checkpoint stores, so that a resumed run reads
exactly the samples the interrupted one would have read next.

Bad samples are skipped and counted, never dropped silently: an image that does not decode, a missing caption,
an image smaller than asked for. A shard that cannot be opened, or breaks off while being read, is retried (going
on after the samples already read), then skipped and counted. (A shard cut exactly between two of its files reads
as a shorter shard: the tar format does not mark the cut.)
"""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://", "az://", "abfs://", "hf://")


def is_shard_spec(dataset: str) -> bool:
    """Whether ``dataset`` names webdataset shards: a ``.tar`` path, pattern or URL, or a folder holding ``.tar``
    files and no images of its own."""
    if dataset.endswith(".tar") or (dataset.startswith(URL_SCHEMES) and ".tar" in dataset):
        return True
    folder = Path(dataset)
    return folder.is_dir() and any(folder.glob("*.tar")) and not (folder / "metadata.jsonl").exists()


def expand_shards(spec: str) -> list[str]:
    """The shards ``spec`` names, in pattern order (a folder's sorted by name). Local shards must exist."""
    from braceexpand import braceexpand

    if not spec.startswith(URL_SCHEMES) and Path(spec).is_dir():
        shards = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"data.dataset={spec!r} is a folder without .tar shards")
        return shards
    shards = list(braceexpand(spec))
    if not spec.startswith(URL_SCHEMES):
        missing = [s for s in shards if not Path(s).is_file()]
        if len(missing) == len(shards):
            raise FileNotFoundError(f"data.dataset={spec!r}: none of its {len(shards)} shard(s) exists "
                                    f"(first: {shards[0]}); give a brace pattern such as /data/part-{{0000..0099}}.tar, "
                                    f"a URL, or a folder of .tar files")
        if missing:
            logger.warning("data.dataset=%r: %d of %d shards do not exist (first: %s); they will be skipped and "
                           "counted", spec, len(missing), len(shards), missing[0])
    return shards


def stream_shards(num_shards: int, seed: int, epoch: int, stream: int, num_streams: int) -> list[int]:
    """The shards (indices) stream ``stream`` of ``num_streams`` reads in ``epoch``: every num_streams-th of that
    epoch's permutation, so that streams are disjoint and together read every shard once."""
    if num_shards < num_streams:
        raise ValueError(f"{num_shards} shard(s) cannot feed {num_streams} streams (processes x data workers) "
                         f"without two of them reading the same shard; use fewer processes or train.num_workers, or "
                         f"write the data in at least {num_streams} shards")
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return order[stream::num_streams].tolist()


@dataclass
class Cursor:
    """Where a stream is: in ``epoch``, the ``shard``-th of its shards, ``sample`` samples already taken from it."""

    epoch: int = 0
    shard: int = 0
    sample: int = 0


@dataclass
class StreamReport:
    """What reading skipped: bad samples by reason (with the first few named), shards that could not be read."""

    bad: Counter = field(default_factory=Counter)
    bad_examples: list = field(default_factory=list)  # [{"key", "shard", "reason"}], at most 100
    unreachable: list = field(default_factory=list)  # [{"shard", "error"}]
    retries: int = 0
    samples: int = 0  # good samples read

    def skip(self, key: str, shard: str, reason: str) -> None:
        self.bad[reason.split(":")[0]] += 1
        if len(self.bad_examples) < 100:
            self.bad_examples.append({"key": key, "shard": shard, "reason": reason})

    def as_dict(self) -> dict:
        return {**asdict(self), "bad": dict(self.bad)}


def open_shard(url: str, timeout: float = 60.0):
    """A binary stream of the shard at ``url``: a local file, HTTP(S), or any fsspec URL."""
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (only http(s) reaches here)
    if url.startswith(URL_SCHEMES):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


class Latent(NamedTuple):
    """A precomputed sample's VAE posterior (`ldm.precompute`): mean and std (C, h, w), float32."""

    mean: object
    std: object
    vae: str  # the encoder's fingerprint
    context: object = None  # the frozen text encoder's embedding of the caption (L, D), when precomputed
    text: str | None = None  # that encoder's fingerprint (`ldm.models.text.text_fingerprint`)
    time_ids: list | None = None  # the image's size conditions as cut (SDXL's `ldm.data.size_conditions`)


def decode_sample(sample: dict, min_size: int = 0):
    """(RGB image, or `Latent` for a latent shard's sample, caption) of a webdataset sample, or the reason it is
    skipped."""
    from PIL import Image

    from ldm.data.images import to_rgb

    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None and "mean.npy" in sample:
        return _decode_latent(sample)
    if key is None:
        return f"no image: the sample has {sorted(k for k in sample if not k.startswith('__'))}"
    caption = None
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8", errors="replace").strip()
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
            caption = meta.get("caption") or meta.get("text") if isinstance(meta, dict) else None
        except ValueError as e:
            return f"bad json: {e}"
    if not caption:
        return "no caption: neither a .txt nor a .json with 'caption' or 'text'"
    try:
        image = Image.open(io.BytesIO(sample[key]))
        image.load()
    except Exception as e:  # PIL raises many types for broken files
        return f"undecodable image: {type(e).__name__}: {e}"
    if min(image.size) < min_size:
        return f"too small: {image.size[0]}x{image.size[1]} < {min_size}"
    return to_rgb(image), caption


def _decode_latent(sample: dict):
    import torch

    try:
        mean, std, context = (torch.from_numpy(np.load(io.BytesIO(sample[k])).astype(np.float32)) if k in sample
                              else None for k in ("mean.npy", "std.npy", "ctx.npy"))
        meta = json.loads(sample["json"])
        caption = sample["txt"].decode("utf-8", errors="replace").strip()
    except Exception as e:  # numpy, json and missing files alike
        return f"bad latent sample: {type(e).__name__}: {e}"
    if not caption:
        return "no caption: a latent sample without .txt"
    return Latent(mean, std, meta.get("vae", ""), context, meta.get("text") if context is not None else None,
                  meta.get("time_ids")), caption


class ShardStream:
    """One stream of samples over ``shards`` (see the module docstring): ``samples(cursor)`` yields
    (cursor after the sample, key, image, caption) forever, epoch after epoch, from ``cursor`` on."""

    def __init__(self, shards: list[str], seed: int, stream: int, num_streams: int, min_size: int = 0,
                 retries: int = 3, backoff: float = 0.5, report: StreamReport | None = None):
        self.shards, self.seed, self.stream, self.num_streams = shards, seed, stream, num_streams
        self.min_size, self.retries, self.backoff = min_size, retries, backoff
        self.report = report if report is not None else StreamReport()
        stream_shards(len(shards), seed, 0, stream, num_streams)  # refuses too few shards now

    def samples(self, cursor: Cursor | None = None) -> Iterator[tuple[Cursor, str, object, str]]:
        for after, url, sample in self.raw_samples(cursor):
            decoded = self.decode(url, sample)
            if decoded is not None:
                yield after, sample["__key__"], decoded[0], decoded[1]

    def decode(self, url: str, sample: dict):
        """(image, caption) of a raw sample, or None after counting why it is skipped."""
        decoded = decode_sample(sample, self.min_size)
        if isinstance(decoded, str):
            self.report.skip(sample.get("__key__", "?"), url, decoded)
            return None
        self.report.samples += 1
        return decoded

    def raw_samples(self, cursor: Cursor | None = None) -> Iterator[tuple[Cursor, str, dict]]:
        """(cursor after the sample, shard, raw sample (its files' bytes by extension)) forever, from ``cursor``."""
        c = Cursor(**asdict(cursor)) if cursor is not None else Cursor()
        while True:
            order = stream_shards(len(self.shards), self.seed, c.epoch, self.stream, self.num_streams)
            read = 0
            for pos in range(c.shard, len(order)):
                url, skip = self.shards[order[pos]], c.sample if pos == c.shard else 0
                for k, sample in enumerate(self._raw(url, skip), start=skip):
                    read += 1
                    yield Cursor(c.epoch, pos, k + 1), url, sample
            if read == 0 and c.shard == 0 and c.sample == 0:
                raise RuntimeError(f"stream {self.stream} read no sample in a whole epoch of {len(order)} shard(s): "
                                   f"{self.report.as_dict()}")
            c = Cursor(c.epoch + 1, 0, 0)

    def _raw(self, url: str, skip: int) -> Iterator[dict]:
        """The samples of one shard after the first ``skip`` (not decoded), retrying a shard that fails to open or
        breaks off; a shard that still fails is skipped and counted."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        done, error = skip, None
        for attempt in range(self.retries + 1):
            if attempt:
                self.report.retries += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with open_shard(url) as f:
                    samples = group_by_keys(tar_file_expander([{"url": url, "stream": f}], handler=_raise))
                    for i, sample in enumerate(samples):
                        if i >= done:
                            done += 1
                            yield sample
                return
            except Exception as e:  # network, file system and tar errors alike
                error = f"{type(e).__name__}: {e}"
                if isinstance(e, FileNotFoundError) and not url.startswith(URL_SCHEMES):
                    break  # a local file that is not there will not appear by retrying
                logger.info("shard %s failed (attempt %d of %d): %s", url, attempt + 1, self.retries + 1, error)
        self.report.unreachable.append({"shard": url, "error": error})
        logger.warning("shard %s skipped: %s", url, error)


def _raise(exn: Exception) -> bool:
    raise exn


# ----------------------------------------------------------------------------------------------
# The trainer's side: the first samples (validation, a new tokenizer), and batches streamed step by step
# ----------------------------------------------------------------------------------------------

def stream_head(shards: list[str], n: int, min_size: int = 0) -> tuple[list[tuple[str, object, str]], StreamReport]:
    """The first ``n`` good samples in the shards' own order (not permuted): [(key, image, caption)], read the
    same way by every process."""
    stream, out = ShardStream(shards, seed=0, stream=0, num_streams=1, min_size=min_size), []
    for pos, url in enumerate(shards):
        for sample in stream._raw(url, 0):
            decoded = decode_sample(sample, min_size)
            if isinstance(decoded, str):
                stream.report.skip(sample.get("__key__", "?"), url, decoded)
                continue
            out.append((f"{url}#{sample['__key__']}", decoded[0], decoded[1]))
            if len(out) == n:
                return out, stream.report
    return out, stream.report


class Share(NamedTuple):
    """This process's samples of one step, [(image or `Latent`, caption)], and the (h, w) they are cut to."""

    samples: list
    size: tuple


def _size(image) -> tuple[int, int]:
    """(width, height) of an image, or of the pixels a `Latent` stands for (its latent size: all latents of a run
    share one factor, so buckets compare alike)."""
    return (image.mean.shape[-1], image.mean.shape[-2]) if isinstance(image, Latent) else image.size


@dataclass
class StreamPlan:
    """A step's global batch from streams: this process's samples, and the choices drawn for the whole batch."""

    samples: list  # [(image, caption)]: this process's share of every micro-batch, one after the other
    size: tuple[int, int]
    flips: object  # (B,) bool tensor for the global batch
    crop_seeds: object  # (B,)
    draws_seed: int
    global_size: int

    def __len__(self) -> int:
        return self.global_size


class StreamSource:
    """Training batches streamed from shards: each process reads its own stream (stream = process index), takes
    its share of every step's global batch from it, and skips the samples held out for validation. Samples are
    shuffled in windows of ``shuffle_buffer`` (each window of raw samples in the order of a permutation drawn from
    (seed, process, window index); only their bytes are held). Images are cut each step (no latent cache) and
    captions tokenized each step. The position (the window's first sample, its index, how many of it were taken)
    of every process is checkpointed (gathered by ``gather_state`` on all processes first), so a resume reads
    exactly what comes next."""

    batches_per_epoch = 2**62  # a stream has no fixed epoch length; epochs are counted per stream (`Cursor`)

    def __init__(self, shards: list[str], seed: int, streams, accelerator, per_process: int, accumulation: int,
                 batch_size: int, transform, tokenize, random_flip: bool, min_size: int = 0,
                 exclude: frozenset = frozenset(), max_bad_fraction: float = 1.0, shuffle_buffer: int = 1,
                 buckets: list[tuple[int, int]] | None = None, contexts: bool = False, arrays: dict | None = None):
        self.acc, self.seed, self.streams = accelerator, seed, streams
        self.per_process, self.accumulation, self.batch_size = per_process, accumulation, batch_size
        self.transform, self.tokenize, self.random_flip = transform, tokenize, random_flip
        self.exclude, self.max_bad_fraction, self.shuffle_buffer = exclude, max_bad_fraction, shuffle_buffer
        self.stream = ShardStream(shards, seed, accelerator.process_index, accelerator.num_processes, min_size)
        self.buckets = buckets  # aspect buckets (h, w), or None: every image cut to a square
        self.contexts = contexts  # latent samples' precomputed text embeddings stand in for their captions' ids
        self.arrays = arrays or {}  # name -> the stage's per-sample arrays (``load_rows``): SDXL's size conditions
        self.window_start, self.window_index, self.emitted = Cursor(), 0, 0
        self.pending: list[tuple] = []  # positions of the samples waiting in bucket queues
        self.positions = None
        self.held_out = 0

    def iterate(self, start: int, stop: int):
        """(step, epoch of this process's stream, this process's `Share` of the step) for steps start..stop-1."""
        shares = self._shares()
        for step in range(start, stop):
            yield step, self.window_start.epoch, next(shares)

    def _shares(self):
        """This process's share of each step: the next samples in window-shuffled order, or with aspect buckets
        the samples of the first bucket to fill a share, in the order they came (each bucket waits in its queue;
        the queues hold at most buckets x (share - 1) samples, which are what a checkpoint's ``pending`` names)."""
        share = self.per_process * self.accumulation
        samples = self._shuffled()
        if self.buckets is None:
            square = (self.transform.resolution,) * 2
            while True:
                yield Share([next(samples)[1] for _ in range(share)], square)
        from ldm.data.buckets import nearest_bucket

        queues = {}
        for pos, sample in self._replay(samples):
            g = nearest_bucket(*_size(sample[0]), self.buckets)
            queue = queues.setdefault(g, [])
            queue.append((pos, sample))
            if len(queue) == share:
                del queues[g]
                self.pending = sorted(p for q in queues.values() for p, _ in q)
                yield Share([sample for _, sample in queue], self.buckets[g])

    def _replay(self, samples):
        """``samples`` (positioned), after the samples a checkpoint left waiting in bucket queues (``pending``):
        read again from the first of them up to the checkpoint's position, keeping only those."""
        pending, head = set(self.pending), (self.window_index, self.emitted)
        if pending:
            first = min(pending)
            self.window_start, self.window_index, self.emitted = Cursor(*first[:3]), first[3], first[4]
            samples = self._shuffled()
            for pos, sample in samples:
                if pos in pending:
                    yield pos, sample
                if (self.window_index, self.emitted) == head:
                    break
        yield from samples

    def _shuffled(self):
        """(position, (image, caption)) in window-shuffled order from the current position, keeping the position;
        a sample's position (epoch, shard, sample of the window's start, window index, its place in the window)
        is where a stream restarted would give it first."""
        raw = self.stream.raw_samples(self.window_start)
        while True:
            window, end = [], self.window_start
            for after, url, sample in raw:
                end = after
                if f"{url}#{sample['__key__']}" in self.exclude:
                    self.held_out += 1
                    continue
                window.append((url, sample))
                if len(window) == self.shuffle_buffer:
                    break
            order = np.random.default_rng([self.seed, self.stream.stream, self.window_index]).permutation(len(window))
            start = self.window_start
            for j in order[self.emitted:]:
                pos = (start.epoch, start.shard, start.sample, self.window_index, self.emitted)
                self.emitted += 1
                decoded = self.stream.decode(*window[j])
                self._check_bad()
                if decoded is not None:
                    yield pos, decoded
            self.window_start, self.window_index, self.emitted = end, self.window_index + 1, 0

    def _check_bad(self) -> None:
        report = self.stream.report
        bad = sum(report.bad.values())
        seen = bad + report.samples
        if (seen >= 100 and bad > self.max_bad_fraction * seen) or (report.samples == 0 and bad >= 1000):
            raise ValueError(f"{bad} of the first {seen} streamed samples could not be used ({dict(report.bad)}; "
                             f"e.g. {report.bad_examples[:3]}), more than data.max_bad_fraction="
                             f"{self.max_bad_fraction}; fix the shards or raise the limit")

    def plan(self, step: int, share: Share) -> StreamPlan:
        import torch

        from ldm.data.batches import step_generator, step_seed

        g = step_generator(self.seed, step, self.streams.augment)
        n = self.batch_size
        _, flip = torch.rand(n, generator=g), torch.rand(n, generator=g) < 0.5  # as BatchSource draws them
        crop_seeds = torch.randint(0, 2**31 - 1, (n,), generator=g)
        return StreamPlan(share.samples, share.size, flip & self.random_flip, crop_seeds,
                          step_seed(self.seed, step, self.streams.draws), n)

    def load(self, plan: StreamPlan, sl: slice) -> dict:
        """This process's samples at the global slice ``sl``: pixels (b, 3, H, W) or precomputed posteriors
        (b, C, h, w), and token ids (b, L) or precomputed text embeddings (b, L, D) as "captions"."""
        import random

        import torch

        k = (sl.start // self.per_process - self.acc.process_index) // self.acc.num_processes  # micro-batch
        rows = plan.samples[k * self.per_process:(k + 1) * self.per_process]
        if self.contexts:
            captions = torch.stack([latent.context for latent, _ in rows])
        else:
            captions = self.tokenize([caption for _, caption in rows])
        flips, seeds = plan.flips[sl].tolist(), plan.crop_seeds[sl].tolist()
        out = {name: arrays.load_rows(rows, plan.size, flips, seeds) for name, arrays in self.arrays.items()}
        if isinstance(rows[0][0], Latent):  # precomputed: cut and encoded once (no flips)
            return {"mean": torch.stack([r[0].mean for r in rows]), "std": torch.stack([r[0].std for r in rows]),
                    "captions": captions, **out}
        pixels = torch.stack([self.transform(image, size=plan.size, rng=random.Random(int(s)), flip=bool(f))
                              for (image, _), f, s in zip(rows, flips, seeds)])
        return {"pixels": pixels, "captions": captions, **out}

    # ---- position and report, checkpointed as JSON ---------------------------------------------

    def gather_state(self) -> None:
        """Every process's position, gathered onto every process (all must call it before a checkpoint)."""
        from accelerate.utils import gather_object

        c = self.window_start
        mine = [c.epoch, c.shard, c.sample, self.window_index, self.emitted]
        self.positions = gather_object([{"position": mine, "pending": [list(p) for p in self.pending]}])

    def state_dict(self) -> dict:
        if self.positions is None:
            raise RuntimeError("gather_state() must run on every process before the stream's state is saved")
        return {"positions": [p["position"] for p in self.positions], "pending": [p["pending"] for p in self.positions],
                "num_processes": self.acc.num_processes, "shuffle_buffer": self.shuffle_buffer,
                "buckets": [list(b) for b in self.buckets] if self.buckets is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state["num_processes"] != self.acc.num_processes:
            raise ValueError(f"the checkpoint streamed its shards on {state['num_processes']} process(es) and this "
                             f"run has {self.acc.num_processes}: each process's stream position would not carry over; "
                             f"resume on {state['num_processes']}")
        for key, now, then in (("data.shuffle_buffer", self.shuffle_buffer, state["shuffle_buffer"]),
                               ("aspect buckets", self.buckets and [list(b) for b in self.buckets],
                                state.get("buckets"))):
            if now != then:
                raise ValueError(f"{key}={now}, but the checkpoint streamed with {then}: the order would not carry "
                                 f"over; resume with the checkpoint's data settings")
        epoch, shard, sample, self.window_index, self.emitted = state["positions"][self.acc.process_index]
        self.window_start = Cursor(epoch, shard, sample)
        self.pending = [tuple(p) for p in state.get("pending", [[]] * self.acc.num_processes)[self.acc.process_index]]

    def summary(self) -> dict:
        """Numbers for the closing summary, over every process (all must call it): samples skipped by reason,
        shard reads that failed, samples held out for validation."""
        from accelerate.utils import gather_object

        reports = gather_object([{**self.stream.report.as_dict(), "held_out": self.held_out}])
        bad = Counter()
        for r in reports:
            bad.update(r["bad"])
        out = {"samples_streamed": sum(r["samples"] for r in reports)}
        if bad:
            out["bad_samples_skipped"] = dict(bad)
        failed = [u for r in reports for u in r["unreachable"]]
        if failed:
            out["shard_reads_failed"] = len(failed)
        return out


# ----------------------------------------------------------------------------------------------
# Writing shards: an image folder with metadata.jsonl, packed
# ----------------------------------------------------------------------------------------------

def pack_folder(folder: str | Path, out: str | Path, per_shard: int = 1000, caption_column: str = "text"
                ) -> list[Path]:
    """Pack an image folder with ``metadata.jsonl`` (one JSON object per line: the image's file name and its
    caption, or a list of captions: the first is kept) into webdataset shards ``out/shard-000000.tar``... of
    ``per_shard`` samples each, keyed by the image's file stem, in the metadata's order. Each shard is written
    under a temporary name and renamed when complete. The metadata is read and checked as for training
    (`ldm.data.sources.read_metadata`: image paths stay inside the folder)."""
    import os
    import tarfile

    from ldm.data.sources import read_metadata

    folder, out = Path(folder), Path(out)
    rows = read_metadata(folder, caption_column)
    if rows is None:
        raise FileNotFoundError(f"{folder} has no metadata.jsonl to pack (one JSON object per line: "
                                f'{{"file_name": "0001.png", "{caption_column}": "a caption"}})')
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(rows), per_shard):
        path = out / f"shard-{s // per_shard:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for row in rows[s:s + per_shard]:
                image = folder / row["file_name"]
                caption = row[caption_column] if isinstance(row[caption_column], str) else row[caption_column][0]
                for name, data in ((f"{image.stem}{image.suffix.lower()}", image.read_bytes()),
                                   (f"{image.stem}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    """``python -m ldm.data.stream pack FOLDER OUT [--per-shard N]``: an image folder as webdataset shards."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ldm.data.stream", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="pack an image folder with metadata.jsonl into .tar shards")
    pack.add_argument("folder")
    pack.add_argument("out")
    pack.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: %(default)s)")
    pack.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    from ldm.engine.errors import user_errors

    with user_errors(args.debug):
        paths = pack_folder(args.folder, args.out, args.per_shard)
    print(f"{len(paths)} shard(s) in {args.out}: {paths[0].name} .. {paths[-1].name}")


if __name__ == "__main__":
    main()
