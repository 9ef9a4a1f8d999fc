"""Data sources, image transform, aspect-ratio buckets and the global batch sampler, on tiny files."""

import io
import json
import math
import random
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.builtin import generate_shapes
from ldm.data.batches import GlobalBatchSampler
from ldm.data.images import ImageCaptionDataset, ImageTransform
from ldm.data.sources import captions_of, image_sizes, load_source
from ldm.data.buckets import make_buckets, nearest_bucket

SIZES = [(8, 8), (48, 32), (16, 24), (32, 48)]  # (width, height)
CAPTIONS = ["a small square", "a wide one", "a tall one", "another tall one"]


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _images() -> list[Image.Image]:
    return [_image(w, h, i) for i, (w, h) in enumerate(SIZES)]


def _same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def _image_dataset(captions=CAPTIONS) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": _images(), "text": list(captions)}, features=features)


def _image_folder(folder, records_extra=None):
    folder.mkdir(parents=True)
    for i, img in enumerate(_images()):
        img.save(folder / f"{i}.png")
    return [{"file_name": f"{i}.png", **(records_extra[i] if records_extra else {})} for i in range(len(SIZES))]


def _load(tmp_path, source, **kwargs) -> datasets.Dataset:
    return load_source(str(source), cache_dir=str(tmp_path / "hf-cache"), **kwargs)


def _check_rows(ds, captions=CAPTIONS, image_column="image", caption_column="text"):
    assert len(ds) == len(SIZES)
    assert isinstance(ds.features[image_column], datasets.Image)
    rows = sorted(ds, key=lambda r: captions_of(r[caption_column])[0])  # some builders reorder files
    want = sorted(zip(captions, _images()), key=lambda p: captions_of(p[0])[0])
    for row, (caption, img) in zip(rows, want):
        assert isinstance(row[image_column], Image.Image) and _same(row[image_column], img)
        assert row[caption_column] == caption


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

def test_image_folder_with_metadata_jsonl(tmp_path):
    folder = tmp_path / "folder"
    records = _image_folder(folder, [{"text": c} for c in CAPTIONS])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _check_rows(_load(tmp_path, folder))


def test_image_folder_with_metadata_csv_and_custom_caption_column(tmp_path):
    folder = tmp_path / "folder"
    captions = [c.replace(" ", ", ", 1) for c in CAPTIONS]  # commas inside quoted csv fields
    records = _image_folder(folder)
    lines = ["file_name,prompt"] + [f'{r["file_name"]},"{c}"' for r, c in zip(records, captions)]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    _check_rows(_load(tmp_path, folder, caption_column="prompt"), captions, caption_column="prompt")


def test_builtin_dataset_reuses_generated_folder(tmp_path):
    generate_shapes(tmp_path / "shapes-train-32", num_images=6, resolution=32)  # what ensure_builtin makes
    ds = _load(tmp_path, "shapes", data_root=str(tmp_path), resolution=32)
    assert len(ds) == 6 and ds[0]["image"].size == (32, 32) and ds[0]["text"].startswith("a ")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    _image_dataset().save_to_disk(str(tmp_path / "single"))
    _check_rows(_load(tmp_path, tmp_path / "single"))

    test_split = _image_dataset(["x", "y", "z", "w"])
    datasets.DatasetDict(train=_image_dataset(), test=test_split).save_to_disk(str(tmp_path / "dict"))
    _check_rows(_load(tmp_path, tmp_path / "dict", split="test"), ["x", "y", "z", "w"])
    with pytest.raises(ValueError, match=r"'validation'.*\['train', 'test'\]"):
        _load(tmp_path, tmp_path / "dict", split="validation")


def test_parquet_file_folder_and_glob(tmp_path):
    ds = _image_dataset()
    ds.to_parquet(str(tmp_path / "one.parquet"))
    _check_rows(_load(tmp_path, tmp_path / "one.parquet"))

    (tmp_path / "shards").mkdir()
    ds.select([0, 1]).to_parquet(str(tmp_path / "shards" / "a.parquet"))
    ds.select([2, 3]).to_parquet(str(tmp_path / "shards" / "b.parquet"))
    _check_rows(_load(tmp_path, tmp_path / "shards"))
    _check_rows(_load(tmp_path, tmp_path / "shards" / "*.parquet"))
    with pytest.raises(ValueError, match="matches no files"):
        _load(tmp_path, tmp_path / "shards" / "*.arrow")


def test_parquet_folder_takes_splits_from_file_names(tmp_path):
    (tmp_path / "hub-like").mkdir()
    _image_dataset().to_parquet(str(tmp_path / "hub-like" / "train-00000.parquet"))
    _image_dataset(["x", "y", "z", "w"]).to_parquet(str(tmp_path / "hub-like" / "test-00000.parquet"))
    _check_rows(_load(tmp_path, tmp_path / "hub-like", split="test"), ["x", "y", "z", "w"])


def test_arrow_file(tmp_path):
    _image_dataset().save_to_disk(str(tmp_path / "saved"))
    arrow = tmp_path / "data.arrow"
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), arrow)
    _check_rows(_load(tmp_path, arrow))


def test_relative_image_paths_and_custom_columns(tmp_path):
    root = tmp_path / "rel"
    (root / "images").mkdir(parents=True)
    paths = []
    for i, img in enumerate(_images()):
        img.save(root / "images" / f"{i}.png")
        paths.append(f"images/{i}.png")
    datasets.Dataset.from_dict({"img": paths, "prompt": CAPTIONS}).to_parquet(str(root / "table.parquet"))
    ds = _load(tmp_path, root / "table.parquet", image_column="img", caption_column="prompt")
    _check_rows(ds, image_column="img", caption_column="prompt")
    assert ds.column_names == ["img", "prompt"]

    datasets.Dataset.from_dict({"img": ["missing.png"], "prompt": ["x"]}).to_parquet(str(root / "bad.parquet"))
    with pytest.raises(ValueError, match="missing.png"):
        _load(tmp_path, root / "bad.parquet", image_column="img", caption_column="prompt")


def test_image_bytes_and_struct_columns(tmp_path):
    blobs = []
    for img in _images():
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    raw = datasets.Dataset.from_dict({"image": blobs, "text": CAPTIONS})  # plain binary column
    raw.to_parquet(str(tmp_path / "bytes.parquet"))
    _check_rows(_load(tmp_path, tmp_path / "bytes.parquet"))
    structs = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs], "text": CAPTIONS})
    structs.to_parquet(str(tmp_path / "structs.parquet"))
    _check_rows(_load(tmp_path, tmp_path / "structs.parquet"))


def test_list_captions(tmp_path):
    folder = tmp_path / "folder"
    lists = [[c, c.upper()] for c in CAPTIONS[:3]] + [[CAPTIONS[3]]]
    records = _image_folder(folder, [{"text": c} for c in lists])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = _load(tmp_path, folder)
    _check_rows(ds, lists)
    items = ImageCaptionDataset(ds, 16)
    assert sorted(items[i]["caption"] for i in range(len(ds))) == sorted(c[0] for c in lists)
    # Rows with different caption counts still batch with torch's default collate.
    batch = next(iter(torch.utils.data.DataLoader(items, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and sorted(batch["caption"]) == sorted(c[0] for c in lists)


def test_captions_of():
    assert captions_of("a cat") == ["a cat"]
    assert captions_of(["a cat", "a kitten"]) == ["a cat", "a kitten"]
    for bad in ([], None, 7, ["a cat", 7]):
        with pytest.raises(ValueError, match="string or a non-empty list of strings"):
            captions_of(bad)


def test_offline_hub_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'someone/no-such-dataset' is not a local path.*offline"):
        _load(tmp_path, "someone/no-such-dataset")


def test_unreadable_local_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a local path nor a Hub dataset"):
        _load(tmp_path, tmp_path / "missing.parquet")
    (tmp_path / "loose").mkdir()
    _image(8, 8, 0).save(tmp_path / "loose" / "0.png")
    with pytest.raises(ValueError, match="metadata.jsonl or metadata.csv"):
        _load(tmp_path, tmp_path / "loose")


def test_missing_columns_are_named(tmp_path):
    _image_dataset().save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"column 'prompt' not in .*\['image', 'text'\]"):
        _load(tmp_path, tmp_path / "saved", caption_column="prompt")
    with pytest.raises(ValueError, match=r"column 'pixels' not in .*\['image', 'text'\]"):
        _load(tmp_path, tmp_path / "saved", image_column="pixels")
    with pytest.raises(ValueError, match="caption column 'image'"):
        _load(tmp_path, tmp_path / "saved", caption_column="image")


def test_image_sizes_without_decoding(tmp_path):
    folder = tmp_path / "folder"
    records = _image_folder(folder, [{"text": c} for c in CAPTIONS])
    rotated = _image(40, 20, 9)
    exif = Image.Exif()
    exif[Image.ExifTags.Base.Orientation] = 6  # rotated 90 degrees: displayed 20 wide, 40 tall
    rotated.save(folder / "rotated.jpg", exif=exif)
    records.append({"file_name": "rotated.jpg", "text": "rotated"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = _load(tmp_path, folder)
    assert image_sizes(ds, "image") == [row["image"].size for row in ds]
    assert (20, 40) in image_sizes(ds, "image")
    _image_dataset().to_parquet(str(tmp_path / "bytes.parquet"))  # images embedded as bytes
    assert image_sizes(_load(tmp_path, tmp_path / "bytes.parquet"), "image") == SIZES


# ----------------------------------------------------------------------------------------------
# Image transform
# ----------------------------------------------------------------------------------------------

def _reference_square(image: Image.Image, resolution: int, center_crop: bool) -> torch.Tensor:
    """The square transform written out independently: scale the short side, crop, map to [-1, 1]."""
    w, h = image.size
    if (w, h) != (resolution, resolution):
        s = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))),
                             Image.Resampling.BICUBIC)
    left, top = ((image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2) if center_crop else (0, 0)
    arr = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float64)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).float()


@pytest.mark.parametrize("center_crop", [True, False])
def test_square_transform_matches_reference(center_crop):
    for img in _images():
        out = ImageTransform(16, center_crop=center_crop)(img)
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
        assert torch.allclose(out, _reference_square(img, 16, center_crop), atol=1e-6)


def test_flip_mirrors_exactly():
    t = ImageTransform(16)
    img = _image(48, 32, 0)
    assert torch.equal(t(img, size=(16, 24), flip=True), t(img, size=(16, 24), flip=False).flip(-1))
    assert torch.equal(t(img), t(img, flip=False))


def test_random_crop_is_deterministic_and_inside_the_image():
    img = _image(48, 32, 0)
    t = ImageTransform(16, random_crop=True)
    assert torch.equal(t(img, rng=random.Random(3)), t(img, rng=random.Random(3)))
    # (16, 16) from 48x32: scaled to 24x16, so the crop is one of the windows at top 0, left 0..8.
    resized = np.asarray(img.resize((24, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    windows = [torch.from_numpy(resized[:, x:x + 16]).permute(2, 0, 1) for x in range(9)]
    seen = set()
    for seed in range(30):
        out = ImageTransform(16, random_crop=True)(img, rng=random.Random(seed))
        seen |= {x for x, win in enumerate(windows) if torch.equal(out, win)}
        assert any(torch.equal(out, win) for win in windows)
    assert len(seen) > 3


def test_output_size_is_the_bucket_size():
    t = ImageTransform(64, random_crop=True)
    for (h, w), img in zip(make_buckets(64, step=16), _images() * 4):
        assert t(img, size=(h, w), rng=random.Random(0)).shape == (3, h, w)


def test_dataset_items():
    ds = _image_dataset()
    base = ImageCaptionDataset(ds, 16)
    assert torch.equal(base[1]["pixel_values"], ImageTransform(16)(ds[1]["image"]))
    assert base[1]["caption"] == CAPTIONS[1]


# ----------------------------------------------------------------------------------------------
# Buckets and sampler
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution,step,max_ratio", [(256, 64, 2.0), (512, 32, 3.0), (32, 64, 2.0)])
def test_make_buckets_properties(resolution, step, max_ratio):
    buckets = make_buckets(resolution, step, max_ratio)
    assert buckets == sorted(set(buckets)) and (resolution, resolution) in buckets
    for h, w in buckets:
        assert h * w <= resolution ** 2 and 1 / max_ratio <= h / w <= max_ratio
        assert (h, w) == (resolution, resolution) or (h % step == 0 and w % step == 0)
        assert (w, h) in buckets
    if resolution % step == 0:  # each width carries the tallest height that fits, or its transpose does
        for h, w in buckets:
            assert (h + step) * w > resolution ** 2 or (w + step) * h > resolution ** 2


def test_nearest_bucket_wide_and_tall():
    buckets = make_buckets(1024, step=64)  # from (704, 1408) through (1024, 1024) to (1408, 704)
    wide = buckets[nearest_bucket(300, 150, buckets)]
    tall = buckets[nearest_bucket(150, 300, buckets)]
    assert wide == (704, 1408) and tall == (1408, 704)
    assert buckets[nearest_bucket(100, 100, buckets)] == (1024, 1024)
    assert buckets[nearest_bucket(100, 1000, buckets)] == (1408, 704)  # beyond max_ratio: the most extreme
    best = min(abs(math.log(300 / 150) - math.log(w / h)) for h, w in buckets)
    assert abs(math.log(300 / 150) - math.log(wide[1] / wide[0])) == best
    # a tie in aspect ratio goes to the larger area
    assert nearest_bucket(10, 10, [(64, 64), (128, 128), (64, 128)]) == 1


def _grouped(num_items=50, seed=0):
    return np.random.default_rng(seed).integers(0, 4, num_items).tolist()


def test_global_batch_sampler():
    groups = _grouped()
    sampler = GlobalBatchSampler(groups, len(groups), batch_size=4, seed=7)
    expected = sum(groups.count(g) // 4 for g in set(groups))
    assert len(sampler) == expected
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))  # each item at most once per epoch
        for batch in batches:
            assert len(batch) == 4 and len({groups[i] for i in batch}) == 1
    assert sampler.batches(1) == GlobalBatchSampler(groups, len(groups), 4, seed=7).batches(1)
    assert sampler.batches(1) != sampler.batches(2)
    assert sampler.batches(1) != GlobalBatchSampler(groups, len(groups), 4, seed=8).batches(1)


def test_global_batch_sampler_one_group_and_remainders():
    sampler = GlobalBatchSampler(None, 10, batch_size=3, seed=0)
    assert len(sampler) == 3 and all(len(b) == 3 for b in sampler.batches(0))
    keep = GlobalBatchSampler(None, 10, batch_size=3, seed=0, drop_last=False)
    assert len(keep) == 4 and sorted(i for b in keep.batches(0) for i in b) == list(range(10))
    with pytest.raises(ValueError, match="no group has a full batch of 8"):
        GlobalBatchSampler([0, 0, 1, 1, 1], 5, batch_size=8, seed=0)



@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("outside", ["../outside/secret.png", "/etc/secret.png"])
def test_metadata_paths_stay_inside_the_dataset_folder(tmp_path, outside, mixed):
    from ldm.data.stream import pack_folder

    folder = tmp_path / "folder"
    records = _image_folder(folder)
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "secret.png")
    rows = [{**r, "text": [c, c]} if i and mixed else {**r, "text": c} for i, (r, c) in enumerate(zip(records, CAPTIONS))]
    rows[1]["file_name"] = outside  # mixed string and list captions: a table built from the rows; else imagefolder
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: file_name .* points outside the dataset folder"):
        _load(tmp_path, folder)
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: file_name .* points outside"):  # the same reader
        pack_folder(folder, tmp_path / "shards")
    assert not list((tmp_path / "shards").glob("*.tar*")) if (tmp_path / "shards").exists() else True


def test_a_relative_dataset_path_with_mixed_captions_loads(tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    records = _image_folder(folder)
    rows = [{**r, "text": [c, c]} if i else {**r, "text": c} for i, (r, c) in enumerate(zip(records, CAPTIONS))]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    assert len(load_source("folder", cache_dir=str(tmp_path / "hf"))) == len(rows)  # not folder/folder/...


def test_images_smaller_than_their_training_size_are_counted_in_a_warning(tmp_path, caplog):
    from ldm.data.splits import make_split
    from ldm.engine.config import load_config
    from ldm.trainer.config import LDMConfig

    folder = tmp_path / "folder"
    folder.mkdir()
    for name, size in (("small.png", (16, 16)), ("wide.png", (60, 30)), ("big.png", (48, 48))):
        Image.new("RGB", size, "red").save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a red square"}) + "\n"
                                                   for n in ("small.png", "wide.png", "big.png")))
    ds = load_source(str(folder), cache_dir=str(tmp_path / "hf"))
    cfg = load_config(LDMConfig, "configs/ldm/tiny.yaml", ["data.resolution=32", "data.bucket_step=8"])
    with caplog.at_level("WARNING", logger="ldm.data.splits"):
        make_split(cfg, ds, str(folder), bucketing=False)
    assert "2 of 3 images" in caplog.text and "the smallest 16x16 to cover 32x32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.data.splits"):  # buckets: the wide one trains at 24x40, not enlarged
        make_split(cfg, ds, str(folder), bucketing=True)
    assert "1 of 3 images" in caplog.text and "16x16" in caplog.text


def test_a_held_out_fraction_smaller_than_a_batch_is_warned_about(tmp_path, caplog):
    from ldm.data.splits import load_splits
    from ldm.engine.config import load_config
    from ldm.trainer.config import LDMConfig

    folder = tmp_path / "folder"
    records = _image_folder(folder)  # a few images: 1 % of them is one
    (folder / "metadata.jsonl").write_text("".join(json.dumps({**r, "text": c}) + "\n" for r, c in zip(records, CAPTIONS)))
    cfg = load_config(LDMConfig, "configs/ldm/tiny.yaml", [f"data.dataset={folder}", "data.validation_fraction=0.01",
                                                            f"data.cache_dir={tmp_path / 'hf'}", "train.batch_size=2"])
    with caplog.at_level("WARNING", logger="ldm.data.splits"):
        load_splits(cfg)
    assert "data.validation_fraction=0.01 of" in caplog.text and "holds out 1, fewer than a batch" in caplog.text


@pytest.mark.parametrize("layout", ["metadata.csv", "train/metadata.jsonl", "train/metadata.csv"])
def test_every_metadata_file_keeps_its_paths_inside_the_dataset_folder(tmp_path, layout):
    """datasets' imagefolder answers a csv (or a split sub-folder's file) naming ../secret.png with a
    DatasetGenerationError traceback; the same check as for metadata.jsonl names the file and line."""
    folder = tmp_path / "folder"
    meta = folder / layout
    records = _image_folder(meta.parent)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    names = [r["file_name"] for r in records]
    names[1] = "../../secret.png" if layout.startswith("train/") else "../secret.png"
    if layout.endswith(".csv"):
        meta.write_text("file_name,text\n" + "".join(f"{n},{c}\n" for n, c in zip(names, CAPTIONS)))
    else:
        meta.write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n" for n, c in zip(names, CAPTIONS)))
    with pytest.raises(ValueError, match=rf"{meta.name}:\d: file_name '.*secret.png' points outside the dataset folder"):
        _load(tmp_path, folder)
