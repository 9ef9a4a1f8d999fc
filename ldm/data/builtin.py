"""Built-in datasets that need no network (their scorers are `ldm.eval.scorers`).

All are written as an image folder with a ``metadata.jsonl`` (``file_name``, ``text``), exactly the format a
user's own data uses, so the demo runs the user's data path.

- ``shapes``: coloured circles, squares and triangles at five positions and three sizes on black,
  captioned "a red circle at the top left". Some (colour, shape, position) combinations are held
  out of training so that evaluation uses prompts the model never saw.
- ``digits``: scikit-learn's real handwritten digits (8x8, upsampled), captioned
  "a handwritten digit 7". Half of them are held out to train the scorer's classifier.
- ``varied`` and ``photos``: diverse procedural drawings and crops of packaged photographs, for an
  autoencoder that reconstructs more than the two sets above (`ldm.data.builtin_images`). They have no scorer."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("shapes", "digits", "varied", "photos")
# Images in the generated splits of the datasets without a fixed size.
VARIED_SIZES = {"train": 20000, "heldout": 512}

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 220, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 220),
}
# Colours and a shape never in `shapes`, for teaching a trained model something new (the LoRA demonstration).
NEW_COLOURS = {"orange": (245, 140, 20), "teal": (0, 128, 128)}
SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("star",)
# Anchor of each position as a fraction of the image side (x, y).
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
SIZES = (0.31, 0.375, 0.44)  # side of the shape's bounding box as a fraction of the image side
NUM_HELDOUT_COMBOS = 16
_HELDOUT_SEED = 1234


def shapes_caption(colour: str, shape: str, position: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"  # none of the training colours starts with a vowel
    return f"{article} {colour} {shape} at the {position}"


def shapes_combos() -> list[tuple[str, str, str]]:
    return [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def shapes_heldout_combos() -> list[tuple[str, str, str]]:
    """The (colour, shape, position) combinations never shown in training; fixed for all runs."""
    combos = shapes_combos()
    idx = np.random.default_rng(_HELDOUT_SEED).choice(len(combos), NUM_HELDOUT_COMBOS, replace=False)
    return [combos[i] for i in sorted(idx)]


def shapes_eval_prompts() -> list[str]:
    return [shapes_caption(*c) for c in shapes_heldout_combos()]


def draw_shape(colour: str, shape: str, position: str, size: float, jitter: tuple[float, float],
               resolution: int = 32) -> Image.Image:
    """Draw one shape, supersampled 4x then downsampled so edges are anti-aliased."""
    ss = 4
    side = resolution * ss
    img = Image.new("RGB", (side, side), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    ax, ay = POSITIONS[position]
    half = size * side / 2
    cx, cy = (ax + jitter[0]) * side, (ay + jitter[1]) * side
    box = (cx - half, cy - half, cx + half, cy + half)
    rgb = COLOURS[colour] if colour in COLOURS else NEW_COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=rgb)
    elif shape == "star":  # five points, one straight up
        pts = [(cx + half * (1 if i % 2 == 0 else 0.45) * math.sin(math.pi * i / 5),
                cy - half * (1 if i % 2 == 0 else 0.45) * math.cos(math.pi * i / 5)) for i in range(10)]
        draw.polygon(pts, fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES + NEW_SHAPES}")
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def write_folder(out_dir: Path, records: list[dict], images: list[Image.Image], info: dict) -> None:
    """Write images + metadata.jsonl, then info.json last so a half-written folder is never reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for rec, img in zip(records, images):
        img.save(out_dir / rec["file_name"])
    with open(out_dir / "metadata.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    tmp = out_dir / "info.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(out_dir / "info.json")


def generate_shapes(out_dir: str | Path, num_images: int = 6000, seed: int = 0, resolution: int = 32,
                    split: str = "train") -> Path:
    """Write the shapes dataset. ``split="train"`` never uses a held-out combination; ``"heldout"`` only those."""
    out_dir = Path(out_dir)
    heldout = set(shapes_heldout_combos())
    combos = [c for c in shapes_combos() if (c in heldout) == (split == "heldout")]
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng(seed)
    records, images = [], []
    for i in range(num_images):
        colour, shape, position = combos[i % len(combos)]
        size = float(rng.choice(SIZES))
        jitter = tuple(rng.uniform(-0.04, 0.04, size=2))
        images.append(draw_shape(colour, shape, position, size, jitter, resolution))
        records.append({"file_name": f"{i:05d}.png", "text": shapes_caption(colour, shape, position),
                        "colour": colour, "shape": shape, "position": position})
    write_folder(out_dir, records, images, {"name": "shapes", "split": split, "num_images": num_images,
                                             "seed": seed, "resolution": resolution})
    return out_dir


def digits_split(seed: int = 0):
    """Real digits split in two fixed halves: ``train`` for models, ``heldout`` for the scorer."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    perm = np.random.default_rng(seed).permutation(len(digits.target))
    half = len(perm) // 2
    x, y = digits.images.astype(np.float32), digits.target
    return (x[perm[:half]], y[perm[:half]]), (x[perm[half:]], y[perm[half:]])


def digit_image(img8: np.ndarray, resolution: int = 32) -> Image.Image:
    """One of scikit-learn's 8x8 digits (values 0..16) as an RGB image, bicubically upsampled."""
    small = Image.fromarray(np.uint8(np.round(img8 * (255.0 / 16.0))), mode="L")
    return small.resize((resolution, resolution), Image.Resampling.BICUBIC).convert("RGB")


def generate_digits(out_dir: str | Path, seed: int = 0, resolution: int = 32, split: str = "train") -> Path:
    """Write scikit-learn's handwritten digits (values 0..16 on 8x8) upsampled to ``resolution``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    out_dir = Path(out_dir)
    train, heldout = digits_split(seed)
    x, y = train if split == "train" else heldout
    records, images = [], []
    for i, (img8, label) in enumerate(zip(x, y)):
        images.append(digit_image(img8, resolution))
        records.append({"file_name": f"{i:05d}.png", "text": f"a handwritten digit {int(label)}",
                        "label": int(label)})
    write_folder(out_dir, records, images, {"name": "digits", "split": split, "num_images": len(y),
                                             "seed": seed, "resolution": resolution})
    return out_dir


def ensure_builtin(name: str, root: str | Path = "data", split: str = "train", resolution: int = 32) -> Path:
    """Return the folder of a built-in dataset, generating it first when absent (deterministic)."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; valid: {BUILTIN_DATASETS}")
    out_dir = Path(root) / f"{name}-{split}-{resolution}"
    if (out_dir / "info.json").exists():
        return out_dir
    logger.info("generating built-in dataset %s (%s split) in %s", name, split, out_dir)
    if name == "shapes":
        return generate_shapes(out_dir, num_images=6000 if split == "train" else 480, split=split,
                               resolution=resolution)
    if name in ("varied", "photos"):
        return generate_varied(out_dir, name, split, resolution)
    return generate_digits(out_dir, split=split, resolution=resolution)


def generate_varied(out_dir: str | Path, name: str, split: str = "train", resolution: int = 32) -> Path:
    """Write ``varied`` (procedural drawings) or ``photos`` (photo crops; the held-out split crops other
    photographs) with `VARIED_SIZES` images. The splits are drawn from different seeds."""
    from ldm.data.builtin_images import photo_images, varied_images

    if split not in VARIED_SIZES:
        raise ValueError(f"split must be one of {tuple(VARIED_SIZES)}, got {split!r}")
    n, seed = VARIED_SIZES[split], {"train": 1, "heldout": 2}[split]
    if name == "varied":
        images, captions = varied_images(n, seed, resolution)
    else:
        images, captions = photo_images(n, seed, resolution, heldout=split == "heldout")
    records = [{"file_name": f"{i:05d}.png", "text": c} for i, c in enumerate(captions)]
    write_folder(Path(out_dir), records, images, {"name": name, "split": split, "num_images": n, "seed": seed,
                                                   "resolution": resolution})
    return Path(out_dir)
