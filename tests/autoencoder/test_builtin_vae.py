"""The VAE shipped inside the package: loads by name, reconstructs held-out built-in images well enough
that the scorers still read them correctly, reconstructs images drawn here, independently of anything it
was trained on, above the suite's floors, and its scaling factor gives unit-variance latents."""

import json

import torch
from PIL import Image

from ldm.data.builtin import generate_digits, generate_shapes
from ldm.data.images import ImageTransform
from ldm.eval.scorers import DigitsScorer, score_shapes
from ldm.models.vae import builtin_vae_dir, load_vae


def _load(folder, n):
    recs = [json.loads(line) for line in open(folder / "metadata.jsonl")][:n]
    images = torch.stack([ImageTransform(32)(Image.open(folder / r["file_name"])) for r in recs])
    return images, [r["text"] for r in recs]


def _roundtrip(vae, x):
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.mean).sample.clamp(-1, 1)
    return dist, recon


def _to_pil(x):
    return [Image.fromarray(((t + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for t in x]


def test_builtin_vae_is_shipped_as_safetensors():
    files = {p.name for p in builtin_vae_dir().iterdir()}
    assert "config.json" in files and "diffusion_pytorch_model.safetensors" in files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".ckpt"))}


def test_builtin_vae_reconstructs_heldout_shapes(tmp_path):
    vae = load_vae("builtin").eval()
    x, captions = _load(generate_shapes(tmp_path / "s", num_images=96, split="heldout"), 96)
    dist, recon = _roundtrip(vae, x)
    mse = ((recon - x) / 2).square().mean()
    assert 10 * torch.log10(1 / mse) > 25  # dB
    assert score_shapes(_to_pil(recon), captions)["all_accuracy"] >= 0.95
    z = (dist.mean + dist.std * torch.randn_like(dist.std)) * vae.config.scaling_factor
    assert 0.8 < float(z.std()) < 1.25


def test_the_shapes_scorer_reads_what_the_builtin_vae_gives_back():
    # A model's images pass through this decoder, so the scorer must read the decoder's version of a real drawing
    # as what was drawn, or no model could score 1. The decoder returns square edges darker than the inside; the
    # bounding-box fill ratio the scorer used before read 6 % of these reconstructions (12 % of the squares) as
    # circles.
    from ldm.data.builtin import SHAPES, shapes_caption, shapes_combos
    from ldm.eval.scorers import real_images

    caps = [shapes_caption(*c) for c in shapes_combos()] * 4  # every (colour, shape, position), 360 drawings
    x = torch.stack([ImageTransform(32)(im) for im in real_images("shapes", caps, seed=11)])
    recon = _to_pil(_roundtrip(load_vae("builtin").eval(), x)[1])
    assert score_shapes(recon, caps)["all_accuracy"] == 1.0
    # It reads shapes, not whatever is asked for: each image against the next shape's caption scores 0.
    wrong = [c.replace(s, SHAPES[(SHAPES.index(s) + 1) % 3]) for c, s in ((c, c.split()[2]) for c in caps)]
    assert score_shapes(recon, wrong)["shape_accuracy"] == 0.0


def test_builtin_vae_reconstructs_digits(tmp_path):
    vae = load_vae("builtin").eval()
    # Held-out digits for fidelity (the VAE never saw them) ...
    x, _ = _load(generate_digits(tmp_path / "h", split="heldout"), 200)
    _, recon = _roundtrip(vae, x)
    assert 10 * torch.log10(1 / ((recon - x) / 2).square().mean()) > 22  # dB
    # ... and the training half for the scorer, whose classifier was fitted on the held-out half.
    x, captions = _load(generate_digits(tmp_path / "t", split="train"), 200)
    _, recon = _roundtrip(vae, x)
    assert DigitsScorer().score(_to_pil(recon), captions)["digit_accuracy"] >= 0.95


def test_builtin_vae_meets_the_suite_floors_on_images_drawn_here(tmp_path):
    from autoencoder.evaluate import SUITE_FLOORS, evaluate_suite
    from ldm.data.builtin_images import HELDOUT_SEED

    seed = 31337  # neither the training splits' seeds nor the suite's own
    assert seed != HELDOUT_SEED
    result = evaluate_suite("builtin", num_images=64, data_root=str(tmp_path), seed=seed)
    assert set(result["sets"]) == set(SUITE_FLOORS)
    low = {k: round(v["psnr_db"], 2) for k, v in result["sets"].items() if v["psnr_db"] < SUITE_FLOORS[k]}
    assert not low, f"below the floors {SUITE_FLOORS}: {low}"
