"""Built-in datasets: deterministic generation, held-out prompts, and scorers that read the real data back."""

import json

import numpy as np
import pytest
from PIL import Image

from ldm.data.builtin import COLOURS, POSITIONS, SHAPES, generate_digits, generate_shapes, shapes_heldout_combos
from ldm.eval.scorers import DigitsScorer, parse_shapes_caption, read_shape, score_shapes


def _load(folder):
    recs = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    return [Image.open(folder / r["file_name"]).convert("RGB") for r in recs], [r["text"] for r in recs]


def test_shapes_generation_is_deterministic_and_scorer_reads_it(tmp_path):
    a = generate_shapes(tmp_path / "a", num_images=180, seed=3)
    b = generate_shapes(tmp_path / "b", num_images=180, seed=3)
    imgs_a, caps_a = _load(a)
    imgs_b, caps_b = _load(b)
    assert caps_a == caps_b
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(imgs_a, imgs_b))
    scores = score_shapes(imgs_a, caps_a)
    assert scores["colour_accuracy"] == 1.0 and scores["position_accuracy"] == 1.0
    assert scores["shape_accuracy"] >= 0.98


def test_heldout_combos_never_in_training(tmp_path):
    heldout = {f"a {c} {s} at the {p}" for c, s, p in shapes_heldout_combos()}
    assert len(heldout) == 16
    _, caps = _load(generate_shapes(tmp_path / "t", num_images=300))
    assert not heldout & set(caps)
    # every colour, shape and position is still seen in training
    seen = [parse_shapes_caption(c) for c in caps]
    assert {s["colour"] for s in seen} == set(COLOURS) and {s["shape"] for s in seen} == set(SHAPES)
    assert {s["position"] for s in seen} == set(POSITIONS)
    imgs, caps = _load(generate_shapes(tmp_path / "h", num_images=96, split="heldout"))
    assert set(caps) == heldout
    assert score_shapes(imgs, caps)["all_accuracy"] >= 0.98


def test_shape_reader_on_blank_and_wrong_images():
    blank = Image.new("RGB", (32, 32))
    assert read_shape(blank)["shape"] is None
    assert score_shapes([blank], ["a red circle at the top left"])["all_accuracy"] == 0.0
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_shapes_caption("a dog at the park")


def test_digits_scorer_on_real_digits(tmp_path):
    imgs, caps = _load(generate_digits(tmp_path / "d"))
    assert len(caps) == 898 and caps[0].startswith("a handwritten digit ")
    scorer = DigitsScorer()
    assert scorer.score(imgs, caps)["digit_accuracy"] >= 0.97
    # shuffled labels score near chance
    rng = np.random.default_rng(0)
    wrong = [f"a handwritten digit {d}" for d in rng.integers(0, 10, len(caps))]
    assert scorer.score(imgs, wrong)["digit_accuracy"] < 0.2


def test_position_confusion_matrix_counts_wanted_against_drawn():
    from ldm.eval.scorers import real_images
    from ldm.data.builtin import shapes_caption

    caps = [shapes_caption("red", "circle", "top left")] * 3 + [shapes_caption("blue", "square", "center")] * 2
    drawn = real_images("shapes", [caps[0], caps[0], shapes_caption("red", "circle", "bottom right")] + caps[3:],
                        seed=0)
    scores = score_shapes(drawn + [Image.new("RGB", (32, 32))], caps + [caps[0]])
    conf = scores["position_confusion"]
    assert conf["rows"] == list(POSITIONS) and conf["columns"] == [*POSITIONS, "none"]
    m = dict(zip(conf["rows"], conf["matrix"]))
    assert m["top left"] == [2, 0, 0, 1, 0, 1]  # two right, one drawn bottom right, one blank
    assert m["center"] == [0, 0, 0, 0, 2, 0] and sum(map(sum, conf["matrix"])) == 6


def test_real_images_are_read_back_as_their_captions():
    from ldm.eval.scorers import digits_eval_prompts, real_images
    from ldm.data.builtin import shapes_eval_prompts

    caps = [p for p in shapes_eval_prompts() for _ in range(3)]
    assert score_shapes(real_images("shapes", caps, seed=1), caps)["all_accuracy"] >= 0.97
    caps = [p for p in digits_eval_prompts() for _ in range(5)]
    # the train half: the scorer's classifier was fitted on the held-out half
    assert DigitsScorer().score(real_images("digits", caps, seed=1, part="train"), caps)["digit_accuracy"] >= 0.95
    with pytest.raises(ValueError, match="no real images"):
        real_images("varied", caps, seed=1)


@pytest.mark.parametrize("resolution", [64, 128])
def test_the_shapes_scorer_reads_any_resolution(resolution):
    # A cascade is scored at its last stage's size: the same drawings at 64 or 128 px read back as at 32 px.
    from ldm.eval.scorers import real_images
    from ldm.data.builtin import shapes_eval_prompts

    caps = [p for p in shapes_eval_prompts() for _ in range(3)]
    images = real_images("shapes", caps, seed=1, resolution=resolution)
    assert images[0].size == (resolution, resolution)
    assert score_shapes(images, caps)["all_accuracy"] >= 0.97


def test_the_shapes_scorer_reads_an_enlarged_image_as_the_original():
    # Soft-edged shapes (as a model draws them), enlarged 4x without interpolation, hold the same shape: the
    # measures must not depend on the resolution they are read at.
    from PIL import ImageFilter

    from ldm.eval.scorers import read_shape, real_images
    from ldm.data.builtin import shapes_eval_prompts

    caps = shapes_eval_prompts()
    for im in real_images("shapes", caps, seed=2):
        soft = im.filter(ImageFilter.GaussianBlur(0.7))
        small, big = read_shape(soft), read_shape(soft.resize((128, 128), Image.Resampling.NEAREST))
        assert abs(small["offset"] - big["offset"]) < 0.01 and abs(small["elongation"] - big["elongation"]) < 0.03
        assert small["shape"] == big["shape"] and small["position"] == big["position"]


def _dim_edges(image, factor):
    from scipy import ndimage

    a = np.asarray(image).astype(np.float32)
    inside = a.max(axis=2) > 20
    a[inside & ~ndimage.binary_erosion(inside)] *= factor
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def test_the_shapes_scorer_reads_soft_and_dim_edges():
    # A decoder's shapes come back with softer and darker edges than they were drawn with (tests/test_builtin_vae.py
    # reads the shipped VAE's reconstructions): neither may change the shape read.
    from PIL import ImageFilter

    from ldm.eval.scorers import real_images
    from ldm.data.builtin import shapes_caption, shapes_combos

    caps = [shapes_caption(*c) for c in shapes_combos()] * 4
    real = real_images("shapes", caps, seed=11)
    assert score_shapes([i.filter(ImageFilter.GaussianBlur(1.0)) for i in real], caps)["shape_accuracy"] == 1.0
    assert score_shapes([_dim_edges(i, 0.55) for i in real], caps)["shape_accuracy"] == 1.0
