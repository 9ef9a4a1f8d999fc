"""Training a super-resolution stage with train_ldm.py: latent and pixel space, the cache and the per-step path,
conditioning augmentation, the export that diffusers' upscaler loads, and the config checks."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionUpscalePipeline

from ldm.engine.records import read_metrics
from ldm.trainer.config import check_config
from ldm.trainer.superres import SuperResolutionObjective, downsample, gaussian_blur
from ldm.trainer.train import train
from pipelines import SuperResolutionPipeline

SR = ["stage=super_resolution", "super_resolution.low_resolution=8", "super_resolution.noise_levels=[0,300]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def low_res_of(pipe_dir, captions):
    from ldm.eval.metrics import to_tensor
    from ldm.eval.scorers import real_images

    return downsample(to_tensor(real_images("shapes", captions, seed=3)), 4)  # 32 px shapes -> 8 px, in [0, 1]


def test_latent_stage_trains_and_its_export_draws_the_same_in_diffusers_upscaler(tiny_cfg):
    cfg = tiny_cfg(*SR, "train.max_steps=40")
    result = train(cfg)
    val = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "val_mse" in r]
    assert val[-1]["val_mse"] < 0.9 * val[0]["val_mse"], val
    assert result["steps"] == 40 and (cfg.run_dir / "samples" / "step-40.png").is_file()
    folder = cfg.run_dir / "pipeline"
    ours = SuperResolutionPipeline.from_pretrained(folder)
    assert ours.unet.config.in_channels == 4 + 3 and ours.config.max_noise_level == 300
    assert ours.vae.config.scaling_factor == 0.08333  # rescaled for diffusers' upscaler
    theirs = StableDiffusionUpscalePipeline.from_pretrained(folder)
    low = low_res_of(folder, ["a red circle at the top left"])
    kw = {"image": low, "num_inference_steps": 4, "guidance_scale": 2.0, "noise_level": 100, "output_type": "np"}
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    a = ours("a red circle at the top left", generator=torch.Generator().manual_seed(0), **kw).images
    b = theirs("a red circle at the top left", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 32, 32, 3)
    assert np.abs(a - b).max() <= 2e-3


def test_per_step_low_res_from_pixels_equals_the_cached_one(tiny_cfg):
    # Random crops of 32 px images at 32 px are the images themselves: the run that derives the low-resolution
    # image from pixels every step must train exactly as the one that reads it from the cache.
    runs = []
    for extra in ([], ["data.random_crop=true"]):
        cfg = tiny_cfg(*SR, "train.max_steps=6", "train.log_every=2", f"name=crop{len(extra)}", *extra)
        train(cfg)
        runs.append([r["loss"] for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "loss" in r and "epoch" in r])
    assert len(runs[0]) == 3
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)


def test_pixel_stage_with_learned_variance_and_blur_trains_and_loads(tiny_cfg):
    cfg = tiny_cfg("stage=super_resolution", "super_resolution.low_resolution=8", "model.vae=none",
                   "data.resolution=16", "diffusion.learned_variance=true", "super_resolution.blur_sigma=[0,1]",
                   "model.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
                   "model.unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]", "train.max_steps=20")
    train(cfg)
    pipe = SuperResolutionPipeline.from_pretrained(cfg.run_dir / "pipeline")
    assert pipe.vae is None and pipe.upscale_factor == 2 and pipe.unet.config.out_channels == 6
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle at the top left", image=torch.rand(1, 3, 8, 8), num_inference_steps=3,
               guidance_scale=1.0, noise_level=50, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_augmentation_draws_levels_in_range_and_keeps_the_base_draws(tiny_cfg):
    from diffusers import DDPMScheduler

    from ldm.data.batches import Plan
    from ldm.diffusion.gaussian import GaussianDiffusion
    from ldm.trainer.objective import LatentDiffusionObjective

    class _VAE:
        config = type("C", (), {"latent_channels": 4, "block_out_channels": [1, 1, 1], "scaling_factor": 1.0,
                                "shift_factor": None})()

    diffusion = GaussianDiffusion.from_scheduler_config(DDPMScheduler(num_train_timesteps=100).config)
    cfg = tiny_cfg()
    plan = Plan(list(range(64)), (32, 32), torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.bool),
                torch.zeros(64, dtype=torch.long), 12345)
    base = LatentDiffusionObjective(diffusion, cfg.diffusion, 0.1, None, _VAE()).draw(plan)
    sr = SuperResolutionObjective(diffusion, cfg.diffusion, 0.1, None, _VAE(), factor=4, noise_levels=(20, 60),
                                  blur_sigma=(0.0, 0.5)).draw(plan)
    for key in base:
        torch.testing.assert_close(sr[key], base[key])
    assert sr["levels"].min() >= 20 and sr["levels"].max() <= 60 and len(set(sr["levels"].tolist())) > 10
    assert sr["aug_noise"].shape == (64, 3, 8, 8) and 0 <= sr["blur"].min() and sr["blur"].max() <= 0.5
    # the augmentation is the low-resolution schedule's q(x_s | x_0), at latent size
    obj = SuperResolutionObjective(diffusion, cfg.diffusion, 0.1, None, _VAE(), factor=4, noise_levels=(0, 999),
                                   blur_sigma=(0.0, 0.0))
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8)
    out = obj.augment(low, torch.tensor([0, 999]), noise)
    a = obj.low_res_scheduler.alphas_cumprod.double()
    torch.testing.assert_close(out[1].double(), a[999].sqrt() * low[1].double() + (1 - a[999]).sqrt() * noise[1].double(),
                               atol=1e-6, rtol=1e-5)


def test_training_crops_cut_latents_and_low_res_at_the_same_place(tiny_cfg):
    from diffusers import DDPMScheduler

    from ldm.data.batches import Plan
    from ldm.diffusion.gaussian import GaussianDiffusion
    from ldm.trainer.objective import LatentDiffusionObjective

    class _VAE:  # latent factor 4 (three resolutions), or none (pixels)
        def __init__(self, levels):
            self.config = type("C", (), {"latent_channels": 3, "block_out_channels": [1] * levels,
                                         "scaling_factor": 1.0, "shift_factor": None})()

    diffusion = GaussianDiffusion.from_scheduler_config(DDPMScheduler(num_train_timesteps=100).config)
    cfg = tiny_cfg()
    plan = Plan(list(range(64)), (32, 32), torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.bool),
                torch.zeros(64, dtype=torch.long), 12345)
    pixels = torch.rand(64, 3, 32, 32)
    for levels, factor in ((3, 4), (1, 2)):  # latent stage (VAE factor 4 = upscaling), pixel stage ×2
        obj = SuperResolutionObjective(diffusion, cfg.diffusion, 0.1, None, _VAE(levels), factor=factor,
                                       noise_levels=(0, 60), blur_sigma=(0.0, 0.0), crop=16)
        draws = obj.draw(plan)
        # the base draws are those of a whole-image plan of the crop's size
        small = LatentDiffusionObjective(diffusion, cfg.diffusion, 0.1, None, _VAE(levels)).draw(
            dataclasses.replace(plan, size=(16, 16)))
        for key in small:
            torch.testing.assert_close(draws[key], small[key])
        corners = draws["corner"]
        assert corners.shape == (64, 2) and corners.min() >= 0 and corners.max() <= 16
        assert (corners % max(obj.factor, factor) == 0).all() and len(set(map(tuple, corners.tolist()))) > 10
        assert draws["aug_noise"].shape == (64, 3, 16 // factor, 16 // factor)
        # "latents" that are block means of the pixels: every crop must be the block means of the pixel crop
        cut = obj.cut({"mean": downsample(pixels, obj.factor), "std": torch.zeros(64, 3, 32 // obj.factor, 32 // obj.factor),
                       "low_res": downsample(pixels, factor), "pixels": pixels, "captions": plan.captions}, corners)
        crops = torch.stack([pixels[i, :, r:r + 16, c:c + 16] for i, (r, c) in enumerate(corners.tolist())])
        torch.testing.assert_close(cut["pixels"], crops)
        torch.testing.assert_close(cut["mean"], downsample(crops, obj.factor))
        torch.testing.assert_close(cut["low_res"], downsample(crops, factor))
        assert cut["std"].shape == (64, 3, 16 // obj.factor, 16 // obj.factor)


def test_stage_trained_on_crops_learns_and_samples_whole_images(tiny_cfg, monkeypatch):
    sizes = set()  # the latent sizes the U-Net is trained on
    network = SuperResolutionObjective.network

    def recording(self, unet, inputs):
        sizes.add(tuple(inputs.conditions["image"].shape[-2:]))
        return network(self, unet, inputs)

    monkeypatch.setattr(SuperResolutionObjective, "network", recording)
    cfg = tiny_cfg(*SR, "super_resolution.train_crop=16", "train.max_steps=40")
    train(cfg)
    assert (4, 4) in sizes  # 16 px crops of the 32 px images: 4x4 latents (validation runs whole: 8x8)
    val = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "val_mse" in r]
    assert val[-1]["val_mse"] < 0.9 * val[0]["val_mse"], val  # the validation loss is on whole images
    pipe = SuperResolutionPipeline.from_pretrained(cfg.run_dir / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle at the top left", image=low_res_of(None, ["a red circle at the top left"]),
               num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_gaussian_blur_per_image():
    x = torch.rand(3, 2, 20, 20, dtype=torch.float64)
    y = gaussian_blur(x, torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(y[0], x[0])  # sigma 0: unchanged
    assert y[2].std() < y[1].std() < x[1].std()
    # interior pixels match a direct 2-D Gaussian of sigma 1 (radius 6: the batch's largest sigma sets it)
    k = torch.arange(-6, 7, dtype=torch.float64)
    g = torch.exp(-k ** 2 / 2)
    g2 = (g[:, None] * g[None]) / (g.sum() ** 2)
    ref = torch.nn.functional.conv2d(x[1:2].transpose(0, 1), g2[None, None]).transpose(0, 1)
    torch.testing.assert_close(y[1:2, :, 6:-6, 6:-6], ref)


@pytest.mark.parametrize("extra, message", [
    (["super_resolution.low_resolution=7"], "must divide data.resolution=32"),
    (["super_resolution.noise_levels=[10,5]"], "super_resolution.noise_levels"),
    (["super_resolution.noise_levels=[0,1000]"], "super_resolution.noise_levels"),
    (["super_resolution.blur_sigma=[-1,0]"], "super_resolution.blur_sigma"),
    (["super_resolution.train_crop=12"], "super_resolution.train_crop=12 .*a multiple of 8"),
    (["super_resolution.train_crop=64"], "must be at most data.resolution=32"),
])
def test_bad_super_resolution_settings_are_refused(tiny_cfg, extra, message):
    with pytest.raises(ValueError, match=message.replace("[", "\\[")):
        check_config(tiny_cfg("stage=super_resolution", "super_resolution.low_resolution=8", *extra))


def test_latent_stage_needs_the_vae_factor_as_upscaling_factor(tiny_cfg):
    cfg = tiny_cfg("stage=super_resolution", "super_resolution.low_resolution=16")  # ×2 with a ×4 VAE
    with pytest.raises(ValueError, match="must be the VAE's factor 4"):
        train(cfg)


def test_vae_tiling_is_for_latent_super_resolution_stages_and_keys_the_cache(tiny_cfg):
    from ldm.models.vae import encoder_fingerprint, load_vae

    with pytest.raises(ValueError, match="model.vae_tiling"):
        check_config(tiny_cfg("model.vae_tiling=true"))
    with pytest.raises(ValueError, match="model.vae_tiling"):
        check_config(tiny_cfg(*SR, "model.vae=none", "model.vae_tiling=true"))
    check_config(tiny_cfg(*SR, "model.vae_tiling=true"))
    vae = load_vae(tiny_cfg().model.vae)
    plain = encoder_fingerprint(vae)
    vae.enable_tiling()
    assert encoder_fingerprint(vae) != plain  # tiled latents differ: they get a cache of their own


def test_max_train_samples_draws_a_fixed_subset(tiny_cfg):
    from ldm.data.splits import load_splits

    full, _, _ = load_splits(tiny_cfg())
    a, _, _ = load_splits(tiny_cfg("data.max_train_samples=20"))
    b, _, _ = load_splits(tiny_cfg("data.max_train_samples=20"))
    assert len(full) == 96 and len(a) == 20
    assert a.captions == b.captions and a.fingerprint != full.fingerprint
    with pytest.raises(ValueError, match="data.max_train_samples=0"):
        check_config(tiny_cfg("data.max_train_samples=0"))
