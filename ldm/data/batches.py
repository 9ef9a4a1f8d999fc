"""One batch source: a step number becomes the global batch of that step and each process's share of it.

Data order, augmentation and every random draw are pure functions of (seed, step): the same on any number of
processes and after a resume, so the step number is all the position a checkpoint needs. A `BatchSource` plans
the global batch of a step (which images, which caption of each, flips, crop seeds) and loads any slice of it
from the latent cache or, when images cannot be cached, as pixels. DreamBooth's class images are a second
source mixed into the same step, with streams of their own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ldm.data.cache import cached_posterior
from ldm.data.images import ImageTransform


class Streams(NamedTuple):
    """The random streams of one source. A stream is a number only so that seeds stay the same from release to
    release; code refers to it by name."""

    draws: int  # the objective's draws: timesteps, diffusion noise, posterior noise, caption dropout
    augment: int  # the source's choices: caption of each image, flip, crop seed


TRAIN_STREAMS = Streams(draws=0, augment=1)
CLASS_STREAMS = Streams(draws=2, augment=3)  # DreamBooth's class images
VAE_POSTERIOR_STREAM = 0  # the autoencoder trainer's posterior noise


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A seed for the random draws of one step in one stream, the same in every process and after a resume."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, stream))


def step_batches(sampler: GlobalBatchSampler, start_step: int, max_steps: int):
    """Yield (step, epoch, global batch indices) from ``start_step``: the epoch and the position in it follow
    from the step because every epoch has ``len(sampler)`` batches."""
    per_epoch = len(sampler)
    step = start_step
    while step < max_steps:
        epoch, pos = divmod(step, per_epoch)
        for batch in sampler.batches(epoch)[pos:]:
            yield step, epoch, batch
            step += 1
            if step >= max_steps:
                return


def batch_at(sampler: GlobalBatchSampler, step: int) -> list[int]:
    """The global batch ``sampler`` gives at ``step`` (epochs follow one another)."""
    return sampler.batches(step // len(sampler))[step % len(sampler)]


def micro_batch_size(batch_size: int, num_processes: int, accumulation_steps: int) -> int:
    """Images per process per forward: a global batch is split over the processes and the accumulation steps."""
    return batch_size // (num_processes * accumulation_steps)


def rank_slice(micro_batch: int, rank: int, num_processes: int, per_process: int) -> slice:
    """This process's share of micro-batch ``micro_batch`` of a global batch: micro-batches are laid out one
    after the other, each split evenly over the processes."""
    first = (micro_batch * num_processes + rank) * per_process
    return slice(first, first + per_process)


class PixelItems(torch.utils.data.Dataset):
    """Images of a split for keys (index, flip, crop_seed), transformed to their bucket's size; the key decides
    the flip, and the crop when ``random_crop``."""

    def __init__(self, split, resolution: int, image_column: str, center_crop: bool, random_crop: bool,
                 background=(255, 255, 255), crop_scale: float = 1.0):
        self.split, self.column = split, image_column
        self.transform = ImageTransform(resolution, center_crop, random_crop, background, crop_scale)

    @classmethod
    def for_split(cls, split, d, random_crop: bool = False) -> PixelItems:
        """The items of ``split`` transformed as the config's ``data`` section ``d`` says."""
        return cls(split, d.resolution, d.image_column, d.center_crop, random_crop, d.alpha_background, d.crop_scale)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key) -> torch.Tensor:
        i, flip, crop_seed = key
        image = self.split.ds[int(i)][self.column]
        return self.transform(image, size=self.split.sizes[int(i)], rng=random.Random(int(crop_seed)),
                              flip=bool(flip))


@dataclass
class Plan:
    """One source's share of a step's global batch, the same on every process."""

    items: list[int]  # (B,) image indices, all of one bucket
    size: tuple[int, int]  # (h, w) in pixels of that bucket
    captions: torch.Tensor  # (B,) index into the source's caption list (with its offset)
    flips: torch.Tensor  # (B,) bool
    crop_seeds: torch.Tensor  # (B,)
    draws_seed: int  # seed of the objective's draws for this step and source

    def __len__(self) -> int:
        return len(self.items)


class CachedArrays:
    """One per-image array of a split read from a cache laid out as the latents' (`ldm.data.cache.latent_cache`,
    its "mean" the array), mirrored with its image: a mask at latent size, a low-resolution image."""

    def __init__(self, cache: dict):
        self.cache = cache

    def load(self, items: list[int], flips: torch.Tensor, crop_seeds: torch.Tensor) -> torch.Tensor:
        return cached_posterior(self.cache, items, flips)[0]


class CutArrays:
    """One per-image array cut each step exactly as its image: a dataset keyed (index, flip, crop seed), as
    `PixelItems` is (a mask when images are cropped anew every step)."""

    def __init__(self, items: torch.utils.data.Dataset):
        self.items = items

    def load(self, items: list[int], flips: torch.Tensor, crop_seeds: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.items[k] for k in zip(items, flips.tolist(), crop_seeds.tolist())])


class BatchSource:
    """A split's batches: ``plan(step)`` the global batch of a step, ``load(plan, sl)`` a slice of it as
    cached posteriors {"mean", "std"} or {"pixels"}, with "captions" (b,) and every extra per-image array by
    its name."""

    def __init__(self, split, sampler: GlobalBatchSampler, seed: int, streams: Streams, random_flip: bool,
                 latents: dict | None = None, pixels: PixelItems | None = None, caption_offset: int = 0,
                 extras: dict | None = None, tags: list | None = None, tokenize=None):
        """``extras``: name -> `CachedArrays` (beside cached latents) or `CutArrays` (beside pixels): the masked
        loss's "mask", a super-resolution stage's "low_res". ``tags``: the `ldm.data.tags.TagRules` of each source
        of the split (by ``split.sources``), which change the captions every step; they are then loaded as token
        ids by ``tokenize``."""
        if (latents is None) == (pixels is None):
            raise ValueError("a batch source reads either cached latents or pixels")
        self.split, self.sampler, self.seed, self.streams = split, sampler, seed, streams
        self.random_flip, self.latents, self.pixels, self.caption_offset = random_flip, latents, pixels, caption_offset
        self.extras = extras or {}
        self.tags, self.tokenize = (tags, tokenize) if tags and any(rule.active for rule in tags) else (None, None)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def iterate(self, start: int, stop: int):
        return step_batches(self.sampler, start, stop)

    def plan(self, step: int, items: list[int] | None = None) -> Plan:
        """The global batch of ``step`` (``items`` when the caller already drew them) and its per-image choices."""
        items = batch_at(self.sampler, step) if items is None else items
        g = step_generator(self.seed, step, self.streams.augment)
        n = len(items)
        caption_u, flip = torch.rand(n, generator=g), torch.rand(n, generator=g) < 0.5
        crop_seeds = torch.randint(0, 2**31 - 1, (n,), generator=g)
        return Plan(items, self.split.sizes[items[0]], self.split.caption_index(items, caption_u) + self.caption_offset,
                    flip & self.random_flip, crop_seeds, step_seed(self.seed, step, self.streams.draws))

    def load(self, plan: Plan, sl: slice) -> dict:
        """The slice ``sl`` of a planned batch: cached posteriors (b, C, h, w) or pixels (b, 3, H, W), the captions
        and the extra arrays (a mask (b, 1, h, w) at latent size when cached, (b, 1, H, W) when cut)."""
        items, flips, crop_seeds = plan.items[sl], plan.flips[sl], plan.crop_seeds[sl]
        if self.latents is not None:
            mean, std = cached_posterior(self.latents, items, flips)
            out = {"mean": mean, "std": std, "captions": plan.captions[sl]}
        else:
            keys = list(zip(items, flips.tolist(), crop_seeds.tolist()))
            out = {"pixels": torch.stack([self.pixels[k] for k in keys]), "captions": plan.captions[sl]}
        for name, extra in self.extras.items():
            out[name] = extra.load(items, flips, crop_seeds)
        if self.tags is not None:
            out["captions"] = self.tokenize(self.tag_captions(items, plan.captions[sl], crop_seeds))
        return out

    def tag_captions(self, items: list[int], captions: torch.Tensor, crop_seeds: torch.Tensor) -> list[str]:
        """The drawn captions with their source's tag rules applied, each from its own seed."""
        sources = self.split.sources
        return [self.tags[0 if sources is None else int(sources[i])].apply(
                    self.split.captions[int(c) - self.caption_offset], random.Random(2 * int(seed) + 1))
                for i, c, seed in zip(items, captions.tolist(), crop_seeds.tolist())]

    def summary(self) -> dict:
        """Numbers for the closing summary: none beyond the split's (its skipped images, its unseen buckets)."""
        return {}


class DatasetSource:
    """Batches of a map-style dataset (items are dicts of tensors): this process's share of every step's
    global batch, loaded by a DataLoader so that workers read ahead. ``iterate`` yields (step, epoch,
    {"data": the collated share, "global_size": images in the global batch})."""

    def __init__(self, dataset, sampler: GlobalBatchSampler, rank: int, per_process: int, num_workers: int = 0):
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self.lo, self.hi = rank * per_process, (rank + 1) * per_process

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def iterate(self, start: int, stop: int):
        shares = _Shares(self.sampler, start, stop, self.lo, self.hi)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=shares, num_workers=self.num_workers)
        for (step, epoch, batch), data in zip(step_batches(self.sampler, start, stop), loader):
            yield step, epoch, {"data": data, "global_size": len(batch)}


class _Shares:
    """A DataLoader batch sampler: items lo..hi-1 of every global batch from step ``start`` to ``stop``."""

    def __init__(self, sampler: GlobalBatchSampler, start: int, stop: int, lo: int, hi: int):
        self.sampler, self.start, self.stop, self.lo, self.hi = sampler, start, stop, lo, hi

    def __iter__(self):
        for _, _, batch in step_batches(self.sampler, self.start, self.stop):
            yield batch[self.lo:self.hi]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class GlobalBatchSampler:
    """Batches of indices that never mix groups, as a pure function of (seed, epoch).

    Each epoch: shuffle the items of every group, cut them into batches of ``batch_size`` (the
    remainder dropped when ``drop_last``, else kept as a smaller batch), then shuffle all groups'
    batches together. The same (seed, epoch) always gives the same batches, and every epoch has the
    same number of them, so training resumes at (epoch, batch index) computed from the step alone.

    ``repeats`` (one number >= 0 per item) makes item i come repeats[i] times an epoch on average: floor(r) times
    always, and its fraction as a share of the group's round(sum of fractions) extra places, drawn each epoch
    without replacement in proportion to the fractions (so a group's number of places is the same every epoch).
    """

    def __init__(self, groups: Sequence[int] | None, num_items: int, batch_size: int, seed: int,
                 drop_last: bool = True, repeats: Sequence[float] | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if groups is not None and len(groups) != num_items:
            raise ValueError(f"groups has {len(groups)} entries but num_items is {num_items}")
        group_of = np.zeros(num_items, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        self.members = [np.flatnonzero(group_of == g) for g in np.unique(group_of)]  # sorted item ids per group
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.repeats = None if repeats is None or np.all(np.asarray(repeats) == 1) else np.asarray(repeats, float)
        if self.repeats is not None and (len(self.repeats) != num_items or (self.repeats < 0).any()):
            raise ValueError(f"repeats needs one number >= 0 per item ({num_items}), got {len(self.repeats)}")
        self._last: tuple[int, list[list[int]]] | None = None  # (epoch, batches): asked for at every step
        if len(self) == 0:
            sizes = {int(group_of[m[0]]): len(m) for m in self.members}
            raise ValueError(f"no group has a full batch of {batch_size}; items per group: {sizes}")

    def _places(self, members: np.ndarray) -> int:
        """Places of a group in every epoch: its items, or the sum of their repeats."""
        if self.repeats is None:
            return len(members)
        r = self.repeats[members]
        return int(np.floor(r).sum() + round(float((r - np.floor(r)).sum())))

    def _epoch_items(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A group's items of one epoch, each as often as its repeats say (see the class docstring)."""
        if self.repeats is None:
            return members
        r = self.repeats[members]
        whole, frac = np.floor(r).astype(np.int64), r - np.floor(r)
        extra = round(float(frac.sum()))
        chosen = rng.choice(members, size=extra, replace=False, p=frac / frac.sum()) if extra else members[:0]
        return np.concatenate([np.repeat(members, whole), chosen])

    def __len__(self) -> int:
        per_group = (self._places(m) // self.batch_size if self.drop_last else -(-self._places(m) // self.batch_size)
                     for m in self.members)
        return sum(per_group)

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``, in order."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if self._last is not None and self._last[0] == epoch:
            return self._last[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for members in self.members:
            shuffled = rng.permutation(self._epoch_items(members, rng))
            stop = len(shuffled) - len(shuffled) % self.batch_size if self.drop_last else len(shuffled)
            batches += [shuffled[i:i + self.batch_size].tolist() for i in range(0, stop, self.batch_size)]
        self._last = (epoch, [batches[i] for i in rng.permutation(len(batches))])
        return self._last[1]
