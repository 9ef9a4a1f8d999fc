"""Image + caption sources through `datasets`: read one, check it, and drop the images that cannot be decoded.

A source is anything `load_source` reads: a built-in dataset, an image folder (images + a
``metadata.jsonl``/``metadata.csv`` with ``file_name`` and a caption column, `datasets`' ``imagefolder``
layout), a folder of images with caption sidecars (``0001.png`` + ``0001.txt``, in kohya-ss's ``N_name``
sub-folders or not: `sidecar_dataset`), a ``save_to_disk`` folder, parquet/arrow files, or a Hub dataset id; `instance_dataset` pairs every
image of a folder with one prompt (DreamBooth's subject). Built-in datasets are generated into the image-folder
layout, so the demo runs the user's data path."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ldm.data.builtin import BUILTIN_DATASETS, ensure_builtin


if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}  # file suffix -> `datasets` builder
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_STRING_DTYPES = ("string", "large_string")
_BINARY_DTYPES = ("binary", "large_binary")
_GLOB_CHARS = frozenset("*?[")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the images of a folder without metadata
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
                bad: list | None = None, caption_extension: str = ".txt") -> datasets.Dataset:
    """Load one split of an image-caption source, its image column decoding to PIL images.

    ``source`` is tried in this order:
      1. a built-in dataset name (`BUILTIN_DATASETS`), generated under ``data_root`` at ``resolution``;
      2. a folder: ``Dataset``/``DatasetDict.save_to_disk`` output, else an image folder with
         ``metadata.jsonl``/``metadata.csv``, else a folder of ``.parquet`` or ``.arrow`` files, else a folder
         of images with ``caption_extension`` sidecars (`sidecar_dataset`);
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
        ds = _load_folder(base, split, cache_dir, caption_column, caption_extension)
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


def _load_folder(folder: Path, split: str, cache_dir: str | None, caption_column: str = "text",
                 caption_extension: str = ".txt") -> datasets.Dataset:
    """A ``save_to_disk`` folder, an image folder with metadata, a folder of parquet/arrow files, or images with
    caption sidecars."""
    import datasets

    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        loaded = datasets.load_from_disk(str(folder))
        return _pick_split(loaded, split, str(folder))
    if _has_metadata(folder):
        check_metadata_files(folder, caption_column)
        mixed = _read_metadata(folder, caption_column)
        if mixed is not None:  # pyarrow cannot infer one type for strings and lists: build it from the rows
            return mixed
        loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir,
                                       download_config=_local_reading())
        return _pick_split(loaded, split, str(folder))
    suffixes = {p.suffix for p in folder.rglob("*") if p.suffix in FILE_BUILDERS}
    if not suffixes and split == "train":
        sidecars = sidecar_dataset(folder, caption_extension, caption_column)
        if sidecars is not None:
            return sidecars
    if len(suffixes) != 1:
        found = "both .parquet and .arrow files" if suffixes else "no dataset"
        raise ValueError(f"folder {str(folder)!r} holds {found}; valid: a save_to_disk dataset "
                         f"(dataset_dict.json or state.json), images with {' or '.join(METADATA_FILES)}, "
                         f"images with caption files beside them (data.caption_extension={caption_extension!r}), "
                         f"or only {' or only '.join(FILE_BUILDERS)} files")
    builder = FILE_BUILDERS[suffixes.pop()]
    loaded = datasets.load_dataset(builder, data_dir=str(folder), cache_dir=cache_dir,
                                   download_config=_local_reading())
    return _pick_split(loaded, split, str(folder))


REPEATS_COLUMN = "_repeats"  # how many times an image comes each epoch (kohya-ss's N_name folders, data.sources)
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


def sidecar_dataset(folder: Path, caption_extension: str = ".txt", caption_column: str = "text"):
    """The images under ``folder`` (sub-folders too) captioned by the text file beside each (``0001.png`` +
    ``0001.txt``), or None when no image has one. A sub-folder named ``N_name`` (kohya-ss's layout:
    ``10_sks dog``) repeats its images N times an epoch (the ``_repeats`` column), and captions its images that
    have no caption file with ``name``; other images without a caption file are skipped, with a count logged."""
    import datasets

    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    rows, missing = [], []
    for path in images:
        sidecar = path.with_suffix(caption_extension)
        match = next((m for m in (_REPEAT_FOLDER.match(part) for part in path.relative_to(folder).parts[:-1]) if m),
                     None)
        if sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        elif match is not None:
            caption = match.group(2)
        else:
            missing.append(str(path.relative_to(folder)))
            continue
        rows.append((str(path), caption, float(match.group(1)) if match is not None else 1.0))
    if not rows:
        return None
    if missing:
        logger.warning("%d of %d images of %s have no %s caption file beside them and are skipped: %s",
                       len(missing), len(images), folder, caption_extension, missing[:20])
    return datasets.Dataset.from_dict({"image": [r[0] for r in rows], caption_column: [r[1] for r in rows],
                                       REPEATS_COLUMN: [r[2] for r in rows]})


def check_metadata_files(folder: Path, caption_column: str = "text") -> None:
    """Check every metadata file `datasets`' imagefolder would read in ``folder`` (top level and split
    sub-folders, ``.jsonl`` and ``.csv``) as `read_metadata` checks a ``metadata.jsonl``: each image path stays
    inside ``folder``; errors name the file and line."""
    import csv

    for base in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        read_metadata(base, caption_column, root=folder)
        path = base / "metadata.csv"
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as f:
            for number, row in enumerate(csv.DictReader(f), start=2):
                name = row.get("file_name")
                if not isinstance(name, str):
                    raise ValueError(f"{path}:{number}: needs a file_name column, got {sorted(row)}")
                if not _inside(folder, name, base):
                    raise ValueError(f"{path}:{number}: file_name {name!r} points outside the dataset folder "
                                     f"{str(folder)!r}; image paths are relative to it and stay inside it")


def read_metadata(folder: Path, caption_column: str = "text", root: Path | None = None) -> list[dict] | None:
    """The rows of ``folder``'s top-level ``metadata.jsonl``, each checked (errors name the file and line): a JSON
    object with a ``file_name`` that stays inside the folder, and a caption that is a string or a list of strings;
    None when there is no such file. Every reader of a metadata file goes through this: the loader (which builds
    the table itself when captions mix strings and lists, and otherwise leaves it to `datasets`' imagefolder,
    after this check) and the shard packer."""
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
        if not _inside(root or folder, row["file_name"], folder):
            raise ValueError(f"{path}:{number}: file_name {row['file_name']!r} points outside the dataset folder "
                             f"{str(root or folder)!r}; image paths are relative to it and stay inside it")
        if caption_column in row:
            try:
                captions_of(row[caption_column])
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows; each line is a JSON object such as "
                         f'{{"file_name": "0001.png", "{caption_column}": "a caption"}}')
    return rows


def _read_metadata(folder: Path, caption_column: str):
    """The dataset of a top-level ``metadata.jsonl`` whose captions mix strings and lists (each string caption as
    a one-item list, image paths resolved inside the folder), which `datasets` cannot type; otherwise None (after
    `read_metadata`'s checks), and `datasets`' imagefolder loads it."""
    import datasets

    rows = read_metadata(folder, caption_column)
    kinds = {type(r.get(caption_column)) for r in rows or () if caption_column in r}
    if not ({str, list} <= kinds):
        return None
    columns = sorted({k for r in rows for k in r} - {"file_name"})
    data = {"image": [os.path.normpath(folder.resolve() / r["file_name"]) for r in rows]}  # absolute: read as given
    for col in columns:
        values = [r.get(col) for r in rows]
        data[col] = [[v] if isinstance(v, str) else v for v in values] if col == caption_column else values
    return datasets.Dataset.from_dict(data)


def _inside(folder: Path, name: str, base: Path | None = None) -> bool:
    """Whether ``name`` (a metadata file_name, relative to ``base``: the metadata file's folder, by default
    ``folder``) is a relative path that stays inside ``folder``."""
    if Path(name).is_absolute() or "://" in name:
        return False
    root = folder.resolve()
    return Path(os.path.normpath((base or folder).resolve() / name)).is_relative_to(root)  # by names: symlinks fine


def _local_reading():
    """`datasets`' download settings for files on this machine: its progress bar says what it does with them
    ("Reading local files", where it would say "Downloading data" of files that are never downloaded)."""
    import datasets

    return datasets.DownloadConfig(download_desc="Reading local files")


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
    loaded = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir, download_config=_local_reading())
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


def instance_dataset(folder: str | Path, prompt: str, image_column: str = "image", caption_column: str = "text"):
    """Every image file in ``folder`` (no captions needed) paired with ``prompt``, as a `datasets.Dataset`."""
    import datasets

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"dreambooth.instance_data={str(folder)!r} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"dreambooth.instance_data={str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if not prompt:
        raise ValueError("dreambooth.instance_prompt is empty; give the subject's prompt, e.g. 'a photo of sks dog'")
    ds = datasets.Dataset.from_dict({image_column: [str(p) for p in files], caption_column: [prompt] * len(files)})
    return ds.cast_column(image_column, datasets.Image())
