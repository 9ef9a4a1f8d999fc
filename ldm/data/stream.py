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
from typing import Iterator

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


def decode_sample(sample: dict, min_size: int = 0):
    """(RGB image, caption) of a webdataset sample, or the reason it is skipped."""
    from PIL import Image

    from ldm.data.images import to_rgb

    key = next((k for k in IMAGE_KEYS if k in sample), None)
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
        c = Cursor(**asdict(cursor)) if cursor is not None else Cursor()
        while True:
            order = stream_shards(len(self.shards), self.seed, c.epoch, self.stream, self.num_streams)
            good_in_epoch = 0
            for pos in range(c.shard, len(order)):
                url, skip = self.shards[order[pos]], c.sample if pos == c.shard else 0
                for k, sample in enumerate(self._raw(url, skip), start=skip):
                    decoded = decode_sample(sample, self.min_size)
                    if isinstance(decoded, str):
                        self.report.skip(sample.get("__key__", "?"), url, decoded)
                        continue
                    good_in_epoch += 1
                    self.report.samples += 1
                    yield Cursor(c.epoch, pos, k + 1), sample["__key__"], decoded[0], decoded[1]
            if good_in_epoch == 0 and c.shard == 0 and c.sample == 0:
                raise RuntimeError(f"stream {self.stream} read no usable sample in a whole epoch of "
                                   f"{len(order)} shard(s): {self.report.as_dict()}")
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
                logger.warning("shard %s failed (attempt %d of %d): %s", url, attempt + 1, self.retries + 1, error)
        self.report.unreachable.append({"shard": url, "error": error})
        logger.warning("shard %s skipped after %d attempts: %s", url, self.retries + 1, error)


def _raise(exn: Exception) -> bool:
    raise exn
