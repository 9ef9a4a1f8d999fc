"""Image + caption data through `datasets`: read a source, transform images, group them into buckets.

A source is anything `load_source` reads: a built-in dataset, an image folder (images + a
``metadata.jsonl``/``metadata.csv`` with ``file_name`` and a caption column, `datasets`' ``imagefolder``
layout), a ``save_to_disk`` folder, parquet/arrow files, or a Hub dataset id. Built-in datasets are
generated into the image-folder layout, so the demo runs the user's data path.

Training at several aspect ratios uses buckets: `make_buckets` lists (height, width) targets of about
the same area, `nearest_bucket` assigns each image one, and `GlobalBatchSampler` draws batches that
never mix buckets, as a pure function of (seed, epoch) so a run resumes from its step number alone.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

from .builtin_data import BUILTIN_DATASETS, ensure_builtin

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # file suffix -> `datasets` builder
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_STRING_DTYPES = ("string", "large_string")
_BINARY_DTYPES = ("binary", "large_binary")
_GLOB_CHARS = frozenset("*?[")
# EXIF orientations that rotate by 90 degrees, so the displayed width and height swap.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

def resolve_data_dir(dataset: str, data_root: str = "data", split: str = "train", resolution: int = 32) -> Path:
    """A built-in name is generated on demand; anything else must be an existing folder."""
    if dataset in BUILTIN_DATASETS:
        return ensure_builtin(dataset, data_root, split=split, resolution=resolution)
    path = Path(dataset)
    if not path.is_dir():
        raise ValueError(f"dataset {dataset!r} is neither a built-in dataset {BUILTIN_DATASETS} "
                         f"nor an existing folder")
    return path


def load_source(source: str, *, split: str = "train", data_root: str = "data", resolution: int = 32,
                image_column: str = "image", caption_column: str = "text",
                cache_dir: str | None = None, max_bad_fraction: float = 0.01,
                bad: list | None = None) -> datasets.Dataset:
    """Load one split of an image-caption source, its image column decoding to PIL images.

    ``source`` is tried in this order:
      1. a built-in dataset name (`BUILTIN_DATASETS`), generated under ``data_root`` at ``resolution``;
      2. a folder: ``Dataset``/``DatasetDict.save_to_disk`` output, else an image folder with
         ``metadata.jsonl``/``metadata.csv``, else a folder of ``.parquet`` or ``.arrow`` files;
      3. a single ``.parquet``/``.arrow`` file, or a glob pattern matching such files;
      4. a Hugging Face Hub dataset id.
    A source without named splits (one file, a glob, a saved ``Dataset``) has the single split "train";
    folders of files take split names from file names (``train-0.parquet``, ``test-0.parquet``).
    The image column may hold images, {bytes, path} dicts, raw bytes or file paths (relative ones are
    resolved against the source's folder); the caption column a string or a list of strings per row.
    ``cache_dir`` is where `datasets` caches what it builds (default: its own cache).

    Every image is decoded once first (`find_bad_images`): rows whose image is missing, empty, truncated,
    corrupt or a decompression bomb are dropped, logged and appended to ``bad``; more than
    ``max_bad_fraction`` of them is an error that names them all.
    """
    if not source:
        raise ValueError("source is empty; give a built-in dataset name, a path, a glob or a Hub dataset id")
    if source in BUILTIN_DATASETS:
        folder = resolve_data_dir(source, data_root, split=split, resolution=resolution)
        ds, base = _load_folder(folder, "train", cache_dir, caption_column), folder  # the folder is the split
    elif Path(source).expanduser().is_dir():
        base = Path(source).expanduser()
        ds = _load_folder(base, split, cache_dir, caption_column)
    elif Path(source).expanduser().is_file() or _GLOB_CHARS & set(source):
        files, base = _data_files(source)
        ds = _load_files(source, files, split, cache_dir)
    else:
        ds, base = _load_hub(source, split, cache_dir), None
    _check_columns(ds, (image_column, caption_column), source)
    _check_caption_feature(ds.features[caption_column], caption_column, source)
    ds = _decode_images(ds, image_column, base, source)
    return drop_bad_images(ds, image_column, source, max_bad_fraction, bad)


def find_bad_images(ds: datasets.Dataset, image_column: str = "image", batch_size: int = 256) -> list[dict]:
    """{"index", "file", "error"} of every row whose image cannot be decoded, in one pass over the data."""
    import datasets

    raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    bad, index = [], 0
    for batch in raw.iter(batch_size=batch_size):
        for value in batch[image_column]:
            problem = _image_problem(value)
            if problem is not None:
                name = (value or {}).get("path") or f"row {index}"
                bad.append({"index": index, "file": name, "error": problem})
            index += 1
    return bad


def _image_problem(value: dict | None) -> str | None:
    """Why an undecoded {bytes, path} image cannot be read, or None."""
    import warnings

    if value is None or (value.get("bytes") is None and not value.get("path")):
        return "no image"
    if value.get("bytes") is None and "://" in value["path"]:
        return None  # remote: `datasets` fetches it when it is used
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
            with Image.open(source) as image:
                image.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        return f"{type(e).__name__}: {e}"
    return None


def drop_bad_images(ds: datasets.Dataset, image_column: str, source: str, max_bad_fraction: float = 0.01,
                    bad: list | None = None) -> datasets.Dataset:
    """``ds`` without the rows whose image cannot be decoded (appended to ``bad`` with the source); an error
    naming all of them when they are more than ``max_bad_fraction`` of the rows."""
    found = find_bad_images(ds, image_column)
    if not found:
        return ds
    fraction = len(found) / len(ds)
    listing = "; ".join(f"{b['file']}: {b['error']}" for b in found)
    if fraction > max_bad_fraction:
        raise ValueError(f"{len(found)} of {len(ds)} images of {source!r} cannot be decoded ({fraction:.1%}, more "
                         f"than data.max_bad_fraction={max_bad_fraction}): {listing}")
    logger.warning("skipping %d of %d images of %s that cannot be decoded: %s", len(found), len(ds), source,
                   listing[:2000])
    if bad is not None:
        bad.extend({"source": str(source), **b} for b in found)
    skip = {b["index"] for b in found}
    return ds.select([i for i in range(len(ds)) if i not in skip])


def _load_folder(folder: Path, split: str, cache_dir: str | None, caption_column: str = "text") -> datasets.Dataset:
    """A ``save_to_disk`` folder, an image folder with metadata, or a folder of parquet/arrow files."""
    import datasets

    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        loaded = datasets.load_from_disk(str(folder))
        return _pick_split(loaded, split, str(folder))
    if _has_metadata(folder):
        mixed = _read_metadata(folder, caption_column)
        if mixed is not None:  # pyarrow cannot infer one type for strings and lists: build it from the rows
            return mixed
        loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir)
        return _pick_split(loaded, split, str(folder))
    suffixes = {p.suffix for p in folder.rglob("*") if p.suffix in FILE_BUILDERS}
    if len(suffixes) != 1:
        found = "both .parquet and .arrow files" if suffixes else "no dataset"
        raise ValueError(f"folder {str(folder)!r} holds {found}; valid: a save_to_disk dataset "
                         f"(dataset_dict.json or state.json), images with {' or '.join(METADATA_FILES)}, "
                         f"or only {' or only '.join(FILE_BUILDERS)} files")
    builder = FILE_BUILDERS[suffixes.pop()]
    loaded = datasets.load_dataset(builder, data_dir=str(folder), cache_dir=cache_dir)
    return _pick_split(loaded, split, str(folder))


def _read_metadata(folder: Path, caption_column: str):
    """Check a top-level ``metadata.jsonl`` line by line (errors name the file and line). When its captions mix
    strings and lists, return the dataset built from its rows (each string caption as a one-item list, image
    paths relative to the folder); otherwise None, and `datasets`' imagefolder loads it."""
    import datasets

    path = folder / "metadata.jsonl"
    if not path.is_file():
        return None
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f"{path}:{number}: needs a \"file_name\" string, got {line.strip()[:120]!r}")
        if caption_column in row:
            try:
                captions_of(row[caption_column])
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows; each line is a JSON object such as "
                         f'{{"file_name": "0001.png", "{caption_column}": "a caption"}}')
    kinds = {type(r.get(caption_column)) for r in rows if caption_column in r}
    if not ({str, list} <= kinds):
        return None
    columns = sorted({k for r in rows for k in r} - {"file_name"})
    data = {"image": [str(folder / r["file_name"]) for r in rows]}
    for col in columns:
        values = [r.get(col) for r in rows]
        data[col] = [[v] if isinstance(v, str) else v for v in values] if col == caption_column else values
    return datasets.Dataset.from_dict(data)


def _has_metadata(folder: Path) -> bool:
    """Metadata in the folder itself or in its split sub-folders (``train/metadata.jsonl``)."""
    return any(p.exists() for name in METADATA_FILES for p in (folder / name, *folder.glob(f"*/{name}")))


def _data_files(source: str) -> tuple[list[str], Path]:
    """The files a file path or glob names, and the folder that relative paths inside them start from."""
    pattern = os.path.expanduser(source)
    if Path(pattern).is_file():
        files, base = [pattern], Path(pattern).parent
    else:
        files = sorted(glob.glob(pattern, recursive=True))
        plain = []  # the leading path components without wildcards
        for part in Path(pattern).parts:
            if _GLOB_CHARS & set(part):
                break
            plain.append(part)
        base = Path(*plain) if plain else Path(".")
    if not files:
        raise ValueError(f"pattern {source!r} matches no files")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or not suffixes <= FILE_BUILDERS.keys():
        raise ValueError(f"{source!r} names files with suffixes {sorted(suffixes)}; valid: all "
                         f"{' or all '.join(FILE_BUILDERS)}")
    return files, base


def _load_files(source: str, files: list[str], split: str, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    builder = FILE_BUILDERS[Path(files[0]).suffix]
    loaded = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir)
    return _pick_split(loaded, split, source)


def _load_hub(source: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    """A Hub dataset; when it is neither local nor reachable, say so instead of a connection trace."""
    import datasets

    valid = (f"valid sources: a built-in dataset {BUILTIN_DATASETS}, an existing folder, a .parquet/.arrow "
             f"file or glob, or a Hub dataset id")
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except ConnectionError as e:
        reason = ("the machine is offline (HF_HUB_OFFLINE is set)" if _hub_offline()
                  else f"the Hub cannot be reached ({e})")
        raise ValueError(f"source {source!r} is not a local path and is not a reachable Hub dataset: "
                         f"{reason}; {valid}") from e
    except FileNotFoundError as e:  # also `datasets`' DatasetNotFoundError
        offline = " (the machine is offline: HF_HUB_OFFLINE is set)" if _hub_offline() else ""
        raise ValueError(f"source {source!r} is neither a local path nor a Hub dataset{offline}; "
                         f"{valid}") from e


def _hub_offline() -> bool:
    """Whether the Hub is switched off, read the way huggingface_hub reads ``HF_HUB_OFFLINE``."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _pick_split(loaded, split: str, source: str) -> datasets.Dataset:
    """One split of a DatasetDict; a plain Dataset is the single split "train"."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    if split not in loaded:
        raise ValueError(f"split {split!r} not in source {source!r}; available splits: {list(loaded)}")
    return loaded[split]


def _check_columns(ds: datasets.Dataset, columns: Sequence[str], source: str) -> None:
    for col in columns:
        if col not in ds.column_names:
            raise ValueError(f"column {col!r} not in dataset {source!r}; columns: {ds.column_names}")


def _is_value(feature, dtypes: Sequence[str]) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in dtypes


def _check_caption_feature(feature, column: str, source: str) -> None:
    """Captions are a string, or a list of strings, per row."""
    inner = feature[0] if isinstance(feature, list) and len(feature) == 1 else getattr(feature, "feature", None)
    if not (_is_value(feature, _STRING_DTYPES) or _is_value(inner, _STRING_DTYPES)):
        raise ValueError(f"caption column {column!r} of {source!r} has type {feature}; valid: a string or "
                         f"a list of strings per row")


def _decode_images(ds: datasets.Dataset, column: str, base: Path | None, source: str) -> datasets.Dataset:
    """Cast the image column to a decoding `datasets.Image`, whatever form the images are stored in."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds if feature.decode else ds.cast_column(column, datasets.Image())
    if _is_value(feature, _STRING_DTYPES):
        ds = _resolve_paths(ds, column, base, source)
    elif not (_is_value(feature, _BINARY_DTYPES) or (isinstance(feature, dict) and feature
                                                     and set(feature) <= {"bytes", "path"})):
        raise ValueError(f"image column {column!r} of {source!r} has type {feature}; valid: images, "
                         f"{{bytes, path}} dicts, bytes, or image file paths")
    return ds.cast_column(column, datasets.Image())


def _resolve_paths(ds: datasets.Dataset, column: str, base: Path | None, source: str) -> datasets.Dataset:
    """Make relative image paths relative to the source's folder and check that the first one exists."""
    import datasets

    if base is None or len(ds) == 0:
        return ds  # Hub sources: paths are whatever the dataset's own loader expects
    paths = [p if p is None or "://" in p or os.path.isabs(p) else str(base / p) for p in ds[column]]
    first = next((p for p in paths if p is not None), None)
    if first is not None and "://" not in first and not Path(first).is_file():
        raise ValueError(f"image column {column!r} of {source!r} holds strings that are not image files: "
                         f"{first!r} does not exist (relative paths are resolved against {str(base)!r})")
    order = ds.column_names
    ds = ds.remove_columns(column).add_column(column, paths, feature=datasets.Value("string"))
    return ds.select_columns(order)


def captions_of(value) -> list[str]:
    """The captions of one row: a string, or a non-empty list of strings (several captions per image)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"caption must be a string or a non-empty list of strings, got {type(value).__name__} "
                     f"{value!r}")


def image_sizes(ds: datasets.Dataset, image_column: str = "image", batch_size: int = 1024) -> list[tuple[int, int]]:
    """(width, height) of every row, as displayed (EXIF rotation applied), read from file headers only."""
    import datasets

    raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    sizes = []
    for batch in raw.iter(batch_size=batch_size):
        sizes.extend(_stored_image_size(value) for value in batch[image_column])
    return sizes


def _stored_image_size(value: dict) -> tuple[int, int]:
    """Size of an undecoded {bytes, path} image; PIL reads only the header until pixels are asked for."""
    import datasets

    if value["bytes"] is None and "://" in (value["path"] or ""):
        return datasets.Image().decode_example(value).size  # remote file: let `datasets` fetch it
    with Image.open(io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"]) as image:
        w, h = image.size
        # PNG's getexif() decodes the whole image to find a trailing eXIf chunk; look in the header only.
        if image.format == "PNG" and "exif" not in image.info:
            return w, h
        orientation = image.getexif().get(Image.ExifTags.Base.Orientation)
    return (h, w) if orientation in _TRANSPOSING_ORIENTATIONS else (w, h)


# ----------------------------------------------------------------------------------------------
# Image transform
# ----------------------------------------------------------------------------------------------

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An RGB image that means what the file shows.

    16-bit greyscale is scaled to 8 bits (PIL's ``convert("RGB")`` clips it, so mid-grey would become white);
    32-bit integer greyscale likewise when its values exceed 255, and float greyscale is read as [0, 1].
    Transparency (RGBA, LA, PA, or a palette or colour marked transparent) is composited over ``background``
    instead of turning black or keeping the hidden colour.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0
        elif image.mode in _SIXTEEN_BIT_MODES or arr.max() > 255:
            top = 65535.0
        else:
            top = 255.0
        image = Image.fromarray(np.clip(np.round(arr / top * 255), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """Resize an image to cover a (height, width) target, crop it, maybe mirror it, map it to [-1, 1].

    Any image mode is read as `to_rgb` says (transparency over ``background``). The crop is random when
    ``random_crop`` (it wins over ``center_crop``), centred when ``center_crop``, else the top-left corner. A random crop's offset comes from the ``rng`` passed to each call (the `random`
    module when None), so a seeded rng gives the same output; the caller decides the flip.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_crop: bool = False,
                 background: Sequence[int] = (255, 255, 255)):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution, self.center_crop = resolution, center_crop
        self.random_crop, self.background = random_crop, tuple(background)

    def __call__(self, image: Image.Image, size: tuple[int, int] | None = None, rng: random.Random | None = None,
                 flip: bool = False) -> torch.Tensor:
        """Return (3, height, width) float32 in [-1, 1], mirrored when ``flip``."""
        th, tw = size if size is not None else (self.resolution, self.resolution)
        if th <= 0 or tw <= 0:
            raise ValueError(f"size must be a positive (height, width), got {size}")
        rng = rng if rng is not None else random
        image = to_rgb(image, self.background)
        w, h = image.size
        if (w, h) != (tw, th):  # scale so both sides cover the target, then crop the excess
            scale = max(tw / w, th / h)
            image = image.resize((max(tw, round(w * scale)), max(th, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = self._crop_offset(image.size, (th, tw), rng)
        image = image.crop((left, top, left + tw, top + th))
        if flip:
            image = ImageOps.mirror(image)
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)

    def _crop_offset(self, image_size: tuple[int, int], target: tuple[int, int], rng) -> tuple[int, int]:
        (w, h), (th, tw) = image_size, target
        if self.random_crop:
            return rng.randint(0, w - tw), rng.randint(0, h - th)
        if self.center_crop:
            return (w - tw) // 2, (h - th) // 2
        return 0, 0


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


class GlobalBatchSampler:
    """Batches of indices that never mix groups, as a pure function of (seed, epoch).

    Each epoch: shuffle the items of every group, cut them into batches of ``batch_size`` (the
    remainder dropped when ``drop_last``, else kept as a smaller batch), then shuffle all groups'
    batches together. The same (seed, epoch) always gives the same batches, and every epoch has the
    same number of them, so training resumes at (epoch, batch index) computed from the step alone.
    """

    def __init__(self, groups: Sequence[int] | None, num_items: int, batch_size: int, seed: int,
                 drop_last: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if groups is not None and len(groups) != num_items:
            raise ValueError(f"groups has {len(groups)} entries but num_items is {num_items}")
        group_of = np.zeros(num_items, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        self.members = [np.flatnonzero(group_of == g) for g in np.unique(group_of)]  # sorted item ids per group
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self._last: tuple[int, list[list[int]]] | None = None  # (epoch, batches): asked for at every step
        if len(self) == 0:
            sizes = {int(group_of[m[0]]): len(m) for m in self.members}
            raise ValueError(f"no group has a full batch of {batch_size}; items per group: {sizes}")

    def __len__(self) -> int:
        per_group = (len(m) // self.batch_size if self.drop_last else -(-len(m) // self.batch_size)
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
            shuffled = rng.permutation(members)
            stop = len(shuffled) - len(shuffled) % self.batch_size if self.drop_last else len(shuffled)
            batches += [shuffled[i:i + self.batch_size].tolist() for i in range(0, stop, self.batch_size)]
        self._last = (epoch, [batches[i] for i in rng.permutation(len(batches))])
        return self._last[1]


# ----------------------------------------------------------------------------------------------
# Torch dataset
# ----------------------------------------------------------------------------------------------

class ImageCaptionDataset(torch.utils.data.Dataset):
    """Lazily transformed (image tensor, caption) pairs over a `datasets.Dataset`, square at ``resolution``.

    Items hold "pixel_values" (3, H, W) and "caption" (the first caption when a row holds several), so
    torch's default collate batches them whatever the caption column holds.
    """

    def __init__(self, ds, resolution: int, image_column: str = "image", caption_column: str = "text",
                 center_crop: bool = True, background: Sequence[int] = (255, 255, 255)):
        self.ds, self.transform = ds, ImageTransform(resolution, center_crop, background=background)
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[int(i)]
        return {"pixel_values": self.transform(row[self.image_column]),
                "caption": captions_of(row[self.caption_column])[0]}
