"""The community trainers' dataset layouts: caption files beside the images, kohya-ss's ``N_name`` folders as
repeats, several sources mixed by repeats or weights (draw frequencies within 3 sigma of what was asked), and tag
captions shuffled and dropped every step with the first tags kept in place."""

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.data.batches import GlobalBatchSampler
from ldm.data.sources import load_source
from ldm.data.splits import load_splits
from ldm.data.tags import TagRules
from ldm.engine.config import load_config
from ldm.trainer.config import LDMConfig, check_config
from tiny_models import sidecar_folder

ROOT = Path(__file__).resolve().parents[2]


def test_caption_files_and_repeat_folders_are_read_and_uncaptioned_images_skipped(tmp_path, data_dir, caplog):
    folder = sidecar_folder(tmp_path / "kohya", data_dir, repeat_folder="3_blob thing")
    shutil.copy(next(data_dir.glob("*.png")), folder / "uncaptioned.png")
    with caplog.at_level("WARNING"):
        ds = load_source(str(folder))
    assert "1 of 17 images" in caplog.text and "uncaptioned.png" in caplog.text
    assert len(ds) == 16
    by_folder = {}
    for image, text, repeats in zip(ds["image"], ds["text"], ds["_repeats"]):
        by_folder.setdefault(repeats, []).append(text)
        assert image.size[0] > 0
    assert len(by_folder[1.0]) == 12 and all(t.startswith("sks, ") for t in by_folder[1.0])
    assert by_folder[3.0] == ["blob thing"] * 4  # the folder's name captions its images without caption files
    other = sidecar_folder(tmp_path / "captions", data_dir, ext=".caption")
    assert len(load_source(str(other), caption_extension=".caption")) == 12
    with pytest.raises(ValueError, match=r"caption files beside them \(data.caption_extension='.txt'\)"):
        load_source(str(other))


def test_repeats_come_as_often_as_asked_within_three_sigma():
    repeats = [1.0] * 10 + [2.5] * 10 + [0.5] * 10  # 40 places an epoch: 8 batches of 5, none dropped
    sampler = GlobalBatchSampler(None, 30, 5, seed=7, repeats=repeats)
    assert len(sampler) == 8
    epochs = 400
    counts = np.zeros(30)
    for epoch in range(epochs):
        for batch in sampler.batches(epoch):
            np.add.at(counts, batch, 1)
    assert counts.sum() == 40 * epochs
    for i, r in enumerate(repeats):
        p = r - np.floor(r)  # the fraction: an extra place drawn with probability p each epoch
        assert abs(counts[i] / epochs - r) <= 3 * np.sqrt(p * (1 - p) / epochs), (i, counts[i] / epochs, r)
    assert sampler.batches(3) == GlobalBatchSampler(None, 30, 5, seed=7, repeats=repeats).batches(3)


def _cfg(tmp_path, *extra):
    return load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", [f"output_dir={tmp_path}", *extra])


def test_sources_mix_by_repeats_or_weights(tmp_path, data_dir):
    a = sidecar_folder(tmp_path / "a", data_dir, n=12, repeat_folder="2_blob")
    b = sidecar_folder(tmp_path / "b", data_dir, n=20, start=40)
    cfg = _cfg(tmp_path, f"data.sources=[{{dataset: {a}, repeats: 3}}, {{dataset: {b}}}]")
    train = load_splits(cfg)[0]
    assert len(train) == 36 and sorted(set(train.repeats.tolist())) == [1.0, 3.0, 6.0]
    assert (train.repeats[train.sources == 1] == 1).all()
    weighted = _cfg(tmp_path, f"data.sources=[{{dataset: {a}, weight: 1}}, {{dataset: {b}, weight: 3}}]")
    train = load_splits(weighted)[0]
    share = [train.repeats[train.sources == k].sum() / train.repeats.sum() for k in (0, 1)]
    assert np.allclose(share, [0.25, 0.75]) and np.isclose(train.repeats.sum(), 36)
    # inside a source, its N_name folder's images still come twice as often as the others
    first = train.repeats[train.sources == 0]
    assert np.isclose(first.max(), 2 * first.min())


@pytest.mark.parametrize("override, message", [
    ("data.sources=[{dataset: a, weight: 1}, {dataset: b}]", "needs a weight on every entry or on none"),
    ("data.sources=[{dataset: a, repeats: -1}]", r"data.sources\[0\].repeats"),
    ("data.sources=[{dataset: '/d/x-{0..3}.tar'}]", "streamed shards go in data.dataset"),
    ("data.sources=[{dataset: a, tag_dropout: 1.0}]", r"data.sources\[0\].tag_dropout"),
    ("data.sources=[{dataset: a, colour: 1}]", r"unknown config key\(s\) \['data.sources\[0\].colour'\]"),
    ("data.caption_extension=txt", "data.caption_extension"),
    ("diffusion.max_timestep=1001", r"diffusion.max_timestep=1001 is not valid"),
    ("diffusion.min_timestep=1000", r"diffusion.min_timestep=1000 is not valid"),
    ("diffusion.distance=l1", r"diffusion.distance='l1' is not one of \['l2', 'huber', 'smooth_l1'\]"),
    ("diffusion.huber_c=0", "diffusion.huber_c"),
])
def test_bad_source_settings_are_refused_by_name(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        check_config(_cfg(tmp_path, override))


def test_tag_rules_keep_the_first_tags_shuffle_and_drop_the_rest():
    rules = TagRules(shuffle=True, keep_tokens=2, dropout=0.3)
    caption = "sks, 1girl, red hair, smiling, outdoors, hat, scarf"
    seen, lengths = set(), []
    for seed in range(200):
        out = rules.apply(caption, random.Random(seed)).split(", ")
        assert out[:2] == ["sks", "1girl"] and set(out[2:]) <= set(caption.split(", ")[2:])
        seen.add(tuple(out)), lengths.append(len(out) - 2)
    assert len(seen) > 100  # shuffled
    assert abs(np.mean(lengths) / 5 - 0.7) < 0.05  # each of the 5 other tags dropped with p = 0.3
    assert TagRules().apply(caption, random.Random(0)) == caption


def test_batches_carry_tag_changed_captions_as_token_ids(tmp_path, data_dir):
    from ldm.data.batches import TRAIN_STREAMS, BatchSource, PixelItems

    folder = sidecar_folder(tmp_path / "tags", data_dir, n=8)
    cfg = _cfg(tmp_path, f"data.dataset={folder}", "data.validation_num_images=2")
    split = load_splits(cfg)[0]
    sampler = GlobalBatchSampler(None, len(split), 4, seed=0)
    texts = []
    source = BatchSource(split, sampler, 0, TRAIN_STREAMS, False, pixels=PixelItems.for_split(split, cfg.data),
                         tags=[TagRules(shuffle=True, keep_tokens=1)], tokenize=lambda c: texts.append(c) or torch.zeros(
                             len(c), 3, dtype=torch.long))
    for step in range(6):
        batch = source.load(source.plan(step), slice(0, 4))
        assert batch["captions"].shape == (4, 3)
    assert all(t.startswith("sks, ") for step in texts for t in step)
    assert len({t for step in texts for t in step}) > 8  # the same images' captions in new orders
