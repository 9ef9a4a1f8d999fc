"""Aspect-ratio buckets: `make_buckets` lists (height, width) targets of about the same area, and
`nearest_bucket` assigns each image one. Batches never mix buckets (`ldm.data.batches.GlobalBatchSampler`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence




logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ----------------------------------------------------------------------------------------------

def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Sorted (height, width) buckets of area at most resolution², sides multiples of ``step``.

    For each width (a multiple of ``step``) take the largest height that keeps the area within
    resolution², add its transpose so portrait and landscape match, and keep the pairs whose aspect
    ratio lies within [1/max_ratio, max_ratio]. (resolution, resolution) is always a bucket.
    """
    if resolution <= 0 or step <= 0:
        raise ValueError(f"resolution and step must be positive, got resolution={resolution}, step={step}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    # h * w <= area and w / h <= max_ratio together bound w by resolution * sqrt(max_ratio).
    for w in range(step, math.isqrt(int(area * max_ratio)) + 1, step):
        h = area // w // step * step
        if h > 0 and 1 / max_ratio <= h / w <= max_ratio:
            buckets |= {(h, w), (w, h)}
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the (height, width) bucket closest in log aspect ratio; ties go to the larger area."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if not buckets:
        raise ValueError("buckets is empty")
    log_aspect = math.log(width / height)

    def distance(i: int) -> tuple[float, int]:
        bh, bw = buckets[i]
        return abs(log_aspect - math.log(bw / bh)), -bh * bw

    return min(range(len(buckets)), key=distance)
