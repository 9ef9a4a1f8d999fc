"""Diverse built-in images for training and testing an autoencoder that generalises: procedural drawings and
crops of real photographs that ship inside installed packages. Nothing is downloaded.

- ``varied``: 1-4 shapes (circles, ellipses, squares, rectangles, triangles, stars, regular polygons, rings,
  lines) of any colour, size, place and rotation, on backgrounds that are plain (any colour, black, grey or
  white), gradients, stripes, checks, smooth or fine noise; sometimes with pixel noise on top.
- ``photos``: crops of real photographs at many scales (from a 32 px window to the whole short side), resized
  to the resolution. Training crops come from scikit-image's sample images; the held-out crops from other
  photographs (scikit-learn's and matplotlib's samples), so a held-out score measures photos never seen.

`generalisation_sets` draws the held-out sets a VAE is judged on: shapes of any colour on black, grey and
white; stars and polygons; crops of held-out photos. They share no image with any training split (other
seeds, other photographs).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, so edges are anti-aliased
SHAPE_KINDS = ("circle", "ellipse", "square", "rectangle", "triangle", "star", "polygon", "ring", "line")
POLYGON_KINDS = ("star", "polygon")
BACKGROUNDS = ("plain", "black", "grey", "white", "gradient", "stripes", "checks", "smooth noise", "fine noise")
PLAIN_BACKGROUNDS = {"black": (0, 0, 0), "grey": (128, 128, 128), "white": (255, 255, 255)}

# scikit-image's colour and grey photographs of real scenes (the training photos) ...
TRAIN_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "camera.png", "coins.png", "moon.png",
                "brick.png", "grass.png", "gravel.png", "page.png", "color.png", "text.png")
# ... and the held-out ones: scikit-learn's two sample photographs and matplotlib's portrait.
HELDOUT_PHOTOS = ("sklearn:china.jpg", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg")


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _background(kind: str, side: int, rng: np.random.Generator) -> Image.Image:
    """A (side, side) RGB background of one of `BACKGROUNDS`."""
    if kind in PLAIN_BACKGROUNDS:
        return Image.new("RGB", (side, side), PLAIN_BACKGROUNDS[kind])
    if kind == "plain":
        return Image.new("RGB", (side, side), _random_colour(rng))
    a, b = np.array(_random_colour(rng), np.float32), np.array(_random_colour(rng), np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        u = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        w = (u - u.min()) / (u.max() - u.min())
    elif kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.4)
        w = (np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period) > 0).astype(np.float32)
    elif kind == "checks":
        cell = rng.uniform(0.06, 0.3)
        w = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    elif kind == "smooth noise":  # random values on a coarse grid, bicubically enlarged
        grid = int(rng.integers(2, 9))
        coarse = rng.uniform(0, 255, size=(grid, grid, 3)).astype(np.uint8)
        return Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
    elif kind == "fine noise":  # cells of 2-4 output pixels: finer than any shape, coarser than pixel noise
        cell = SUPERSAMPLE * int(rng.integers(2, 5))
        w = rng.uniform(0, 1, size=(-(-side // cell),) * 2).astype(np.float32)
        w = np.kron(w, np.ones((cell, cell), np.float32))[:side, :side]
    else:
        raise ValueError(f"unknown background {kind!r}; valid: {BACKGROUNDS}")
    arr = a * (1 - w[..., None]) + b * w[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _regular_points(cx: float, cy: float, radius: float, n: int, rotation: float,
                    inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon, or of an n-pointed star when ``inner`` (inner/outer radius) is given."""
    pts = []
    for i in range(n * (2 if inner else 1)):
        r = radius * (inner if inner and i % 2 else 1.0)
        a = rotation + math.pi * i / n * (1 if inner else 2)
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def draw_kind(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, size: float, colour, rng) -> None:
    """Draw one shape of `SHAPE_KINDS` centred at (cx, cy), ``size`` across (supersampled pixels)."""
    h = size / 2
    rot = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=colour)
    elif kind == "ellipse":
        k = rng.uniform(0.4, 0.8)
        draw.ellipse((cx - h, cy - h * k, cx + h, cy + h * k), fill=colour)
    elif kind in ("square", "rectangle"):
        k = 1.0 if kind == "square" else rng.uniform(0.3, 0.7)
        pts = [(-h, -h * k), (h, -h * k), (h, h * k), (-h, h * k)]
        if rng.random() < 0.5:  # half of them turned
            pts = [(x * math.cos(rot) - y * math.sin(rot), x * math.sin(rot) + y * math.cos(rot)) for x, y in pts]
        draw.polygon([(cx + x, cy + y) for x, y in pts], fill=colour)
    elif kind == "triangle":
        draw.polygon(_regular_points(cx, cy, h, 3, rot), fill=colour)
    elif kind == "star":
        draw.polygon(_regular_points(cx, cy, h, int(rng.integers(5, 9)), rot, inner=rng.uniform(0.35, 0.6)),
                     fill=colour)
    elif kind == "polygon":
        draw.polygon(_regular_points(cx, cy, h, int(rng.integers(5, 9)), rot), fill=colour)
    elif kind == "ring":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), outline=colour,
                     width=max(SUPERSAMPLE, int(size * rng.uniform(0.1, 0.25))))
    elif kind == "line":
        dx, dy = h * math.cos(rot), h * math.sin(rot)
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=int(SUPERSAMPLE * rng.uniform(1, 3)))
    else:
        raise ValueError(f"unknown shape kind {kind!r}; valid: {SHAPE_KINDS}")


def draw_varied(rng: np.random.Generator, resolution: int = 32, background: str | tuple[str, ...] = BACKGROUNDS,
                kinds: tuple[str, ...] = SHAPE_KINDS, max_shapes: int = 4, pixel_noise: float = 0.1
                ) -> tuple[Image.Image, str]:
    """One procedural image and its caption: 1..``max_shapes`` shapes of ``kinds`` in random colours, sizes
    (12-90% of the side) and places over ``background`` (one of them when a tuple); with probability
    ``pixel_noise``, Gaussian pixel noise on top."""
    side = resolution * SUPERSAMPLE
    background = background if isinstance(background, str) else str(rng.choice(background))
    img = _background(background, side, rng)
    draw = ImageDraw.Draw(img)
    drawn = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = str(rng.choice(kinds))
        size = side * rng.uniform(0.12, 0.9)
        cx, cy = rng.uniform(0, side, size=2)
        draw_kind(draw, kind, cx, cy, size, _random_colour(rng), rng)
        drawn.append(kind)
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    if rng.random() < pixel_noise:
        arr = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(3, 20), size=(resolution, resolution, 3))
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    return img, f"{' and '.join(drawn)} on a {background} background"


def photo_path(name: str) -> Path:
    """The file of a packaged photograph: ``sklearn:``, ``matplotlib:`` or (no prefix) scikit-image's data."""
    package, _, file = name.rpartition(":")
    if package == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / file
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / file
    try:
        import skimage
    except ImportError as e:
        raise ImportError("the `photos` training images are scikit-image's sample photographs: "
                          "pip install scikit-image") from e
    return Path(skimage.__file__).parent / "data" / file


def load_photos(names) -> list[Image.Image]:
    photos = []
    for name in names:
        path = photo_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"packaged photograph {name!r} not found at {path}")
        photos.append(Image.open(path).convert("RGB"))
    return photos


def photo_crop(photo: Image.Image, rng: np.random.Generator, resolution: int = 32) -> Image.Image:
    """A square crop whose side is log-uniform between ``resolution`` and the photo's short side, moved to a
    random place, mirrored half the time, and resized (box filter, so no aliasing) to ``resolution``."""
    w, h = photo.size
    side = int(round(math.exp(rng.uniform(math.log(resolution), math.log(min(w, h))))))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = photo.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.Resampling.BOX)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def varied_images(num_images: int, seed: int, resolution: int = 32) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    pairs = [draw_varied(rng, resolution) for _ in range(num_images)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def photo_images(num_images: int, seed: int, resolution: int = 32, heldout: bool = False
                 ) -> tuple[list[Image.Image], list[str]]:
    names = HELDOUT_PHOTOS if heldout else TRAIN_PHOTOS
    photos, rng = load_photos(names), np.random.default_rng(seed)
    images, captions = [], []
    for i in range(num_images):
        k = i % len(photos)  # every photo equally often
        images.append(photo_crop(photos[k], rng, resolution))
        captions.append(f"a crop of a photograph ({names[k].rpartition(':')[2].split('.')[0]})")
    return images, captions


# Seeds of the held-out sets; training splits use other seeds (see `ldm.data.builtin.ensure_builtin`).
HELDOUT_SEED = 777


def generalisation_sets(num_images: int = 128, seed: int = HELDOUT_SEED, resolution: int = 32
                        ) -> dict[str, list[Image.Image]]:
    """The held-out sets a VAE is judged on, each ``num_images`` images drawn from ``seed``: shapes of the
    simple kinds in any colour on black, grey and white; stars and polygons on plain or gradient backgrounds
    of any colour; crops of held-out photographs."""
    simple = ("circle", "ellipse", "square", "rectangle", "triangle")
    sets = {}
    for i, bg in enumerate(("black", "grey", "white")):
        rng = np.random.default_rng([seed, i])
        sets[f"shapes on {bg}"] = [draw_varied(rng, resolution, bg, simple, max_shapes=3, pixel_noise=0)[0]
                                   for _ in range(num_images)]
    rng = np.random.default_rng([seed, 3])
    sets["stars and polygons"] = [draw_varied(rng, resolution, ("plain", "black", "grey", "white", "gradient"),
                                              POLYGON_KINDS, max_shapes=3, pixel_noise=0)[0]
                                  for _ in range(num_images)]
    sets["photo crops"] = photo_images(num_images, seed + 4, resolution, heldout=True)[0]
    return sets
