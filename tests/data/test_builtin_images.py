"""The diverse built-in images: deterministic, what their names say, and held-out sets that share nothing
with the training splits (other seeds, other photographs)."""

import numpy as np
import pytest

from ldm.data.builtin import ensure_builtin, generate_varied
from ldm.data.builtin_images import (BACKGROUNDS, HELDOUT_PHOTOS, TRAIN_PHOTOS, draw_varied, generalisation_sets,
    photo_crop, photo_images, varied_images)


def _arrays(images):
    return [np.asarray(im) for im in images]


def test_varied_images_are_deterministic_and_diverse():
    a, caps = varied_images(40, seed=5)
    b, _ = varied_images(40, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in a)
    assert len({c.rsplit(" on a ", 1)[1] for c in caps}) >= 6  # many kinds of background
    assert len({x.tobytes() for x in _arrays(a)}) == 40


@pytest.mark.parametrize("background, rgb", [("black", 0), ("grey", 128), ("white", 255)])
def test_plain_backgrounds_are_what_they_say(background, rgb):
    rng = np.random.default_rng(0)
    for _ in range(10):
        img, caption = draw_varied(rng, background=background, kinds=("circle",), max_shapes=1, pixel_noise=0)
        arr = np.asarray(img).reshape(-1, 3)
        values, counts = np.unique(arr, axis=0, return_counts=True)
        assert tuple(values[counts.argmax()]) == (rgb,) * 3  # the most common pixel is the background
        assert caption.endswith(f"on a {background} background")
    with pytest.raises(ValueError, match="unknown background"):
        draw_varied(rng, background="plaid")
    assert "fine noise" in BACKGROUNDS


def test_photo_crops_come_from_the_named_photographs():
    assert not set(TRAIN_PHOTOS) & set(HELDOUT_PHOTOS)
    images, captions = photo_images(6, seed=0, heldout=True)
    assert [c.split("(")[1][:-1] for c in captions[:3]] == ["china", "flower", "grace_hopper"]
    assert all(im.size == (32, 32) for im in images)
    from PIL import Image

    big = Image.new("RGB", (200, 100), (10, 20, 30))
    crop = photo_crop(big, np.random.default_rng(0), 16)
    assert crop.size == (16, 16) and np.asarray(crop).max() == 30


def test_heldout_sets_share_no_image_with_training_splits(tmp_path):
    sets = generalisation_sets(16)
    assert list(sets) == ["shapes on black", "shapes on grey", "shapes on white", "stars and polygons",
                          "photo crops"]
    train = {x.tobytes() for x in _arrays(varied_images(200, seed=1)[0])}  # the `varied` training seed
    assert not train & {x.tobytes() for s in sets.values() for x in _arrays(s)}
    again = generalisation_sets(16)
    assert all(np.array_equal(x, y) for k in sets for x, y in zip(_arrays(sets[k]), _arrays(again[k])))


def test_varied_builtin_folder(tmp_path, monkeypatch):
    import ldm.data.builtin as bd

    monkeypatch.setitem(bd.VARIED_SIZES, "train", 12)
    folder = ensure_builtin("varied", tmp_path, "train")
    assert folder == tmp_path / "varied-train-32"
    assert len(list(folder.glob("*.png"))) == 12 and (folder / "info.json").is_file()
    with pytest.raises(ValueError, match="split must be"):
        generate_varied(tmp_path / "x", "varied", "validation")
