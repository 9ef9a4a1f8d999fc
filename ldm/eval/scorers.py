"""Scorers that read the built-in datasets' captions back off pixels, and the real images generated ones are
compared with.

- ``shapes``: colour from the blob's mean, shape from its corners (`read_shape`), position from its centroid;
  accuracies and the position confusion matrix (`score_shapes`).
- ``digits``: an RBF-SVM trained on the held-out half of the real digits (`DigitsScorer`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldm.data.builtin import (
    COLOURS,
    NEW_COLOURS,
    NEW_SHAPES,
    POSITIONS,
    SHAPES,
    SIZES,
    digit_image,
    digits_split,
    draw_shape,
    shapes_eval_prompts,
)

logger = logging.getLogger(__name__)
SCORED_DATASETS = ("shapes", "digits")  # the built-in datasets whose captions a scorer reads back off pixels
# The shape is read off the pixels brighter than `_MASK_LEVEL` of the blob's peak by two measures that do not
# depend on how bright its edges are: the triangles point up, so their centroid sits below the middle of their
# height (by 1/6 of it; 0 for the others), and an upright square is sqrt(2) times as wide across its diagonals as
# across its sides, where a disc is as wide every way. Ranges measured on 1,440 drawings (every (colour, shape,
# position) eight times, two seeds), as drawn, at 128 px, blurred (Gaussian, radius 0.7 and 1 px), with their edge
# pixels dimmed to 55 %, and passed through the shipped VAE: centroid offset triangles 0.063 and above, the others
# 0.043 at most; diagonal / side width circles 1.131 at most, squares 1.257 and above. The boundaries sit in the
# gaps. (A bounding box's fill ratio reads 6 % of the VAE's reconstructions of real squares as circles: their edge
# pixels come back darker.) Squares tilted by more than a few degrees read as circles: no built-in data draws them.
_MASK_LEVEL = 0.35
_TRIANGLE_MIN_OFFSET = 0.055
_SQUARE_MIN_ELONGATION = 1.2
# A five-pointed star (inner radius 0.45 of the outer) covers ~0.56 of its convex hull; the three shapes above
# cover 0.9 or more. Only read when new shapes are allowed (``with_new``).
_STAR_MAX_SOLIDITY = 0.78


# ----------------------------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------------------------

def _as_uint8(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.dtype != np.uint8:
        arr = np.uint8(np.clip(np.round(arr * 255.0), 0, 255))
    return arr


def palette(with_new: bool = False) -> dict:
    return {**COLOURS, **NEW_COLOURS} if with_new else COLOURS


def shape_names(with_new: bool = False) -> tuple[str, ...]:
    return SHAPES + NEW_SHAPES if with_new else SHAPES


def parse_shapes_caption(caption: str, with_new: bool = False) -> dict:
    words = caption.strip().split(" at the ")
    if len(words) != 2:
        raise ValueError(f"not a shapes caption: {caption!r}")
    colour_shape = words[0].split()
    if len(colour_shape) != 3 or colour_shape[1] not in palette(with_new) or colour_shape[2] not in shape_names(with_new) \
            or words[1] not in POSITIONS:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return {"colour": colour_shape[1], "shape": colour_shape[2], "position": words[1]}


def read_shape(image, with_new: bool = False) -> dict:
    """Read colour, shape and position of the largest bright blob off the pixels.

    Colour: nearest palette colour to the blob's mean (``with_new``: the new colours too); shape: a triangle when
    the centroid sits below the middle of the blob's height, else a square when it is much wider across its
    diagonals than across its sides (its corners), else a circle, and with ``with_new`` a star
    when the blob covers little of its convex hull; position: nearest anchor to its centroid. ``offset`` and
    ``elongation`` are the two shape measures.
    """
    from scipy import ndimage

    arr = _as_uint8(image).astype(np.float32)  # (H, W, 3)
    res = arr.shape[0]
    bright = arr.max(axis=2)  # (H, W)
    blob = _bright_blob(bright)
    if blob is None:
        return {"colour": None, "shape": None, "position": None, "offset": 0.0, "elongation": 0.0}
    # The blob with its soft edge: one pixel at the 32 px the datasets are drawn at, and as wide in image terms at
    # any other size (a 128 px image read as its 32 px version is).
    peak = np.percentile(bright[blob], 90)
    region = ndimage.binary_dilation(blob, iterations=max(1, round(res / 32)))
    shape_mask = (bright > _MASK_LEVEL * peak) & region  # holds the blob: the level is below 100 of 255
    shape_labels, n = ndimage.label(shape_mask)
    shape_mask = _largest(shape_labels, shape_mask, n)
    offset, elongation = _offset_and_elongation(shape_mask)
    shape = "triangle" if offset >= _TRIANGLE_MIN_OFFSET else "square" if elongation >= _SQUARE_MIN_ELONGATION \
        else "circle"
    if with_new:
        coverage = np.clip(bright / peak, 0.0, 1.0) * region
        if _solidity(coverage) < _STAR_MAX_SOLIDITY:
            shape = "star"
    ys, xs = np.nonzero(blob)
    mean = arr[blob].mean(axis=0)
    colours = palette(with_new)
    colour = min(colours, key=lambda c: float(np.sum((mean - np.array(colours[c])) ** 2)))
    cx, cy = (xs.mean() + 0.5) / res, (ys.mean() + 0.5) / res
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return {"colour": colour, "shape": shape, "position": position, "offset": offset, "elongation": elongation}


def blob_centroid(image) -> tuple[float, float] | None:
    """(x, y) in pixels, from the top-left corner, of the centroid of the largest bright blob (as `read_shape`
    finds it); None when nothing is drawn."""
    blob = _bright_blob(_as_uint8(image).astype(np.float32).max(axis=2))
    if blob is None:
        return None
    ys, xs = np.nonzero(blob)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def _bright_blob(bright: np.ndarray) -> np.ndarray | None:
    """The largest connected region brighter than 100 of 255 in a (H, W) brightness map; None when none is."""
    from scipy import ndimage

    mask = bright > 100
    labels, n = ndimage.label(mask)
    return _largest(labels, mask, n) if n else None


def _largest(labels: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    from scipy import ndimage

    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


# Unit vectors (as columns) across which widths are measured: x, y and the two diagonals.
_WIDTH_DIRECTIONS = np.array([[1.0, 0.0, 0.5 ** 0.5, 0.5 ** 0.5], [0.0, 1.0, 0.5 ** 0.5, -(0.5 ** 0.5)]])


def _pixel_corners(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(4N, 2) x, y of the four corners of each pixel: the outline of the pixels as squares, not points."""
    return np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])


def _offset_and_elongation(mask: np.ndarray) -> tuple[float, float]:
    """(centroid below the middle of the height, as a fraction of it; mean width across the two diagonals over
    mean width across the two axes) of a mask.

    Widths are taken over the corners of the mask's pixels: an upright square is sqrt(2), a disc of any size
    close to 1, an upright triangle 1.06."""
    ys, xs = np.nonzero(mask)
    top, height = ys.min(), ys.max() - ys.min() + 1
    offset = ((ys.mean() + 0.5 - top) - height / 2) / height
    proj = _pixel_corners(ys, xs).astype(np.float64) @ _WIDTH_DIRECTIONS
    widths = proj.max(axis=0) - proj.min(axis=0)
    return float(offset), float(widths[2:].sum() / widths[:2].sum())


def _solidity(coverage: np.ndarray) -> float:
    """Covered area over the area of the convex hull of the pixels more than half covered."""
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(coverage > 0.5)
    try:
        hull = ConvexHull(_pixel_corners(ys, xs))
    except QhullError:  # a line of pixels: no area to speak of
        return 1.0
    return float(coverage.sum() / hull.volume)  # in 2-D, `volume` is the area


def score_shapes(images, captions, with_new: bool = False) -> dict:
    """Accuracy of colour, shape, position (and all three) of images against their captions, and the position
    confusion matrix: ``matrix[i][j]`` counts images asked for position ``rows[i]`` whose shape was read at
    ``columns[j]`` ("none": no shape found)."""
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    rows, columns = list(POSITIONS), [*POSITIONS, "none"]
    matrix = [[0] * len(columns) for _ in rows]
    for img, cap in zip(images, captions, strict=True):
        want, got = parse_shapes_caption(cap, with_new), read_shape(img, with_new)
        ok = {k: got[k] == want[k] for k in ("colour", "shape", "position")}
        for k, v in ok.items():
            hits[k] += int(v)
        hits["all"] += int(all(ok.values()))
        matrix[rows.index(want["position"])][columns.index(got["position"] or "none")] += 1
    n = max(len(captions), 1)
    return {f"{k}_accuracy": v / n for k, v in hits.items()} | {
        "num_images": len(captions), "position_confusion": {"rows": rows, "columns": columns, "matrix": matrix}}


@dataclass
class DigitsScorer:
    """An RBF-SVM classifier trained on the held-out half of the real digits, applied to 8x8 reductions."""

    seed: int = 0

    def __post_init__(self):
        from sklearn.svm import SVC

        _, (x, y) = digits_split(self.seed)
        # RBF SVM: ~98.5% on the other (real) half, against ~95% for logistic regression.
        self.clf = SVC(C=5.0, gamma=0.001).fit(x.reshape(len(x), -1), y)

    @staticmethod
    def to_8x8(image) -> np.ndarray:
        gray = Image.fromarray(_as_uint8(image)).convert("L").resize((8, 8), Image.Resampling.BOX)
        return np.asarray(gray, dtype=np.float32).reshape(-1) * (16.0 / 255.0)

    def predict(self, images) -> np.ndarray:
        return self.clf.predict(np.stack([self.to_8x8(im) for im in images]))

    def score(self, images, captions) -> dict:
        labels = [digit_label(cap) for cap in captions]
        pred = self.predict(images)
        return {"digit_accuracy": float(np.mean(pred == np.array(labels))), "num_images": len(labels)}


def digit_label(caption: str) -> int:
    last = caption.strip().split()[-1]
    if not caption.startswith("a handwritten digit ") or not last.isdigit():
        raise ValueError(f"not a digits caption: {caption!r}")
    return int(last)


def real_images(name: str, captions: list[str], seed: int, part: str = "heldout", resolution: int = 32
                ) -> list[Image.Image]:
    """One real image per caption, drawn from ``seed``: for ``shapes`` a new drawing of the caption (size and
    jitter as in the dataset), for ``digits`` a real digit of that label from ``part`` ("train" or "heldout"
    half); at ``resolution`` (the same draws at any resolution). The reference that generated images are
    compared with."""
    rng = np.random.default_rng(seed)
    if name == "shapes":
        out = []
        for cap in captions:
            c = parse_shapes_caption(cap, with_new=True)
            size, jitter = float(rng.choice(SIZES)), tuple(rng.uniform(-0.04, 0.04, size=2))
            out.append(draw_shape(c["colour"], c["shape"], c["position"], size, jitter, resolution))
        return out
    if name == "digits":
        train, heldout = digits_split()
        x, y = train if part == "train" else heldout
        return [digit_image(x[rng.choice(np.flatnonzero(y == digit_label(cap)))], resolution) for cap in captions]
    raise ValueError(f"no real images for {name!r}; valid: {SCORED_DATASETS}")


def digits_eval_prompts() -> list[str]:
    return [f"a handwritten digit {d}" for d in range(10)]


def eval_prompts(name: str) -> list[str]:
    if name == "shapes":
        return shapes_eval_prompts()
    if name == "digits":
        return digits_eval_prompts()
    raise ValueError(f"no built-in scorer for {name!r}; valid: {SCORED_DATASETS}")


def score_each(name: str, images, captions) -> dict[str, np.ndarray]:
    """Per image, 1.0 where the scorer reads the caption back (each accuracy of `score`, image by image): the
    samples a bootstrap of the accuracies resamples."""
    if name == "shapes":
        rows = [score_shapes([im], [cap]) for im, cap in zip(images, captions, strict=True)]
        return {k: np.array([r[k] for r in rows]) for k in ("colour_accuracy", "shape_accuracy",
                                                             "position_accuracy", "all_accuracy")}
    if name == "digits":
        labels = np.array([digit_label(cap) for cap in captions])
        return {"digit_accuracy": (DigitsScorer().predict(images) == labels).astype(float)}
    raise ValueError(f"no built-in scorer for {name!r}; valid: {SCORED_DATASETS}")


def score(name: str, images, captions) -> dict:
    if name == "shapes":
        return score_shapes(images, captions)
    if name == "digits":
        return DigitsScorer().score(images, captions)
    raise ValueError(f"no built-in scorer for {name!r}; valid: {SCORED_DATASETS}")
