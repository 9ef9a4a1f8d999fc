"""VAE evaluation: identical images score perfectly, noised ones worse; the CLI-level function writes
its JSON and PNG for a tiny VAE on a tiny folder."""

import json

import torch
from diffusers import AutoencoderKL

from autoencoder.evaluate import FixedFeatures, evaluate, reconstruction_metrics
from ldm.data.builtin import generate_shapes
from ldm.eval.metrics import PSNR_CAP_DB


def _images(n=64, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_identical_images_are_perfect_and_noise_is_worse():
    x = _images()
    same = reconstruction_metrics(x, x.clone())
    assert same["psnr_db"] == PSNR_CAP_DB and abs(same["ssim"] - 1) < 1e-6 and abs(same["frechet_distance"]) < 1e-8
    g = torch.Generator().manual_seed(1)
    noisy = reconstruction_metrics(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    noisier = reconstruction_metrics(x, (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    assert noisier["psnr_db"] < noisy["psnr_db"] < PSNR_CAP_DB
    assert noisier["ssim"] < noisy["ssim"] < 1
    assert noisier["frechet_distance"] > noisy["frechet_distance"] > 0


def test_feature_space_is_fixed():
    x = _images(4)
    torch.testing.assert_close(FixedFeatures()(x), FixedFeatures()(x))
    assert FixedFeatures()(x).shape == (4, 96)


def test_evaluate_writes_json_and_png(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    data = generate_shapes(tmp_path / "data", num_images=20)
    result = evaluate(str(tmp_path / "vae"), str(data), out=str(tmp_path / "out"))
    assert result["num_images"] == 20 and len(result["latents"]["channel_std"]) == 4
    saved = json.loads((tmp_path / "out" / "vae_eval.json").read_text())
    assert saved["psnr_db"] == result["psnr_db"]
    assert (tmp_path / "out" / "reconstructions.png").stat().st_size > 0


def test_suite_reports_every_set_against_its_floor(tmp_path, capsys, monkeypatch):
    from autoencoder.evaluate import SUITE_FLOORS, main

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    monkeypatch.chdir(tmp_path)  # the built-in held-out splits are generated under ./data
    main(["--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "out"), "--num-images", "8"])
    saved = json.loads((tmp_path / "out" / "vae_eval.json").read_text())
    assert list(saved["sets"]) == list(SUITE_FLOORS)
    # An untrained VAE reconstructs nothing: every set is below its floor, and the table says so.
    assert not saved["all_meet_floors"] and all(not s["meets_floor"] for s in saved["sets"].values())
    assert all(s["num_images"] == 8 and s["floor_psnr_db"] == SUITE_FLOORS[k] for k, s in saved["sets"].items())
    out = capsys.readouterr().out
    assert out.count("below floor") == len(SUITE_FLOORS) and "photo crops" in out
    assert (tmp_path / "out" / "reconstructions.png").stat().st_size > 0
