"""Masked loss: the masked-out half of an image does not reach the gradients; the loss is the mean over the
masked-in pixels whatever their area; masks are cut, flipped and cached exactly as their images, from a
``<name>_mask.png`` file, the alpha channel or a column; a masked training run trains."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import ZeroText

from ldm.data.batches import PixelItems, Plan
from ldm.data.cache import cached_posterior
from ldm.data.masks import MaskItems, mask_path
from ldm.diffusion.gaussian import GaussianDiffusion, make_betas
from ldm.trainer.config import DiffusionConfig
from ldm.trainer.objective import LatentDiffusionObjective
from ldm.trainer.train import build_run, train

pytestmark = pytest.mark.usefixtures("one_thread")


class _VAEConfig:
    scaling_factor, shift_factor, latent_channels, block_out_channels = 1.0, None, 4, [8, 16, 16]


class _VAE:
    config = _VAEConfig()


class _Pointwise(LatentDiffusionObjective):
    """The denoiser is a 1x1 convolution: each output pixel sees only its own input pixel."""

    def network(self, unet, inputs):
        return lambda x, t: unet(x)


def _loss_and_grads(mean, mask, floor=0.0):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 1)
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    objective = _Pointwise(diffusion, DiffusionConfig(), 0.0, ZeroText(),
                           _VAE(), mask_floor=floor)
    n = len(mean)
    plan = Plan(list(range(n)), (32, 32), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool),
                torch.zeros(n, dtype=torch.long), draws_seed=5)
    batch = {"mean": mean, "std": torch.full_like(mean, 0.1), "captions": torch.zeros(n, dtype=torch.long)}
    if mask is not None:
        batch["mask"] = mask
    terms, loss = objective(net, [(batch, objective.draw(plan), slice(0, n))], "cpu")
    loss.backward()
    return terms, loss, torch.cat([p.grad.flatten() for p in net.parameters()])


def test_the_masked_out_half_does_not_reach_the_gradients():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(6, 4, 8, 8, generator=g)
    other = mean.clone()
    other[..., :4] = 5 * torch.randn(6, 4, 8, 4, generator=g)  # the left half: anything else
    half = torch.ones(6, 1, 8, 8)
    half[..., :4] = 0
    _, _, grads = _loss_and_grads(mean, half)
    _, _, grads_other = _loss_and_grads(other, half)
    torch.testing.assert_close(grads_other, grads, rtol=1e-6, atol=1e-7)
    # without the mask (or with a floor) the left half does count
    assert not torch.allclose(_loss_and_grads(other, None)[2], _loss_and_grads(mean, None)[2], atol=1e-4)
    assert not torch.allclose(_loss_and_grads(other, half, floor=0.1)[2], grads, atol=1e-4)


def test_the_loss_is_the_mean_over_the_masked_in_pixels():
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(4, 4, 8, 8, generator=g)
    plain, _, _ = _loss_and_grads(mean, None)
    ones, _, _ = _loss_and_grads(mean, torch.ones(4, 1, 8, 8))
    torch.testing.assert_close(ones["mse"], plain["mse"])  # a full mask changes nothing
    # A mask of one half gives that half's mean error, not half of it: the scale does not follow the area.
    # With the same half of the image copied to the other side, the masked loss equals the unmasked one.
    mirrored = torch.cat([mean[..., 4:], mean[..., 4:]], dim=-1)
    half = torch.ones(4, 1, 8, 8)
    half[..., :4] = 0
    masked, _, _ = _loss_and_grads(mirrored, half)
    # the pointwise model's error per pixel depends on its own pixel and noise; compare with the error maps
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 1)
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    objective = _Pointwise(diffusion, DiffusionConfig(), 0.0, ZeroText(), _VAE())
    plan = Plan(list(range(4)), (32, 32), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool),
                torch.zeros(4, dtype=torch.long), draws_seed=5)
    draws = objective.draw(plan)
    inputs = objective.inputs({"mean": mirrored, "std": torch.full_like(mirrored, 0.1),
                               "captions": torch.zeros(4, dtype=torch.long)}, draws, slice(0, 4), "cpu")
    z0, t, noise = inputs.latents, inputs.timesteps, inputs.noise
    xt = diffusion.q_sample(z0, t, noise)
    err = (net(xt) - diffusion.training_target(z0, noise, t)) ** 2
    torch.testing.assert_close(masked["mse"], err[..., 4:].flatten(1).mean(1).detach(), rtol=1e-5, atol=1e-6)
    # a pixel-size mask is area-averaged to latent size (factor 4 here)
    pixel = half.repeat_interleave(4, -1).repeat_interleave(4, -2)
    from_pixels, _, _ = _loss_and_grads(mirrored, pixel)
    torch.testing.assert_close(from_pixels["mse"], masked["mse"])


def _folder(root, n=6):
    """Images 40x24 of random blocks, each with a _mask.png equal to its red channel, and an RGBA copy whose
    alpha is the red channel too."""
    rng = np.random.default_rng(0)
    root.mkdir()
    rows = []
    for i in range(n):
        arr = np.zeros((24, 40, 3), np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, 20), rng.integers(0, 34)
            arr[y:y + 5, x:x + 7] = rng.integers(30, 255, 3)
        Image.fromarray(arr).save(root / f"{i}.png")
        Image.fromarray(arr[..., 0]).save(mask_path(root / f"{i}.png"))
        rows.append({"file_name": f"{i}.png", "text": f"blocks {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _split(tiny_cfg, data, *extra):
    from ldm.data.splits import load_splits

    cfg = tiny_cfg("data.resolution=16", *extra, data=data)
    return cfg, load_splits(cfg)[0]


@pytest.mark.parametrize("random_crop, bucketing", [(False, False), (True, False), (False, True)])
def test_masks_are_cut_and_flipped_as_their_images(tmp_path, tiny_cfg, random_crop, bucketing):
    data = _folder(tmp_path / "blocks")
    cfg, split = _split(tiny_cfg, data, f"data.random_crop={str(random_crop).lower()}", "data.center_crop=false",
                        f"data.bucketing={str(bucketing).lower()}", "data.bucket_step=4")
    if bucketing:  # 40x24 images go to a wide bucket, not the 16x16 square
        assert split.sizes[0][1] > split.sizes[0][0]
    d = cfg.data
    pixels = PixelItems(split, d.resolution, d.image_column, d.center_crop, random_crop)
    masks = MaskItems(split, d.resolution, d.image_column, d.center_crop, random_crop, "file")
    assert masks.unmasked == 0
    for i in range(len(split)):
        for flip in (False, True):
            seed = random.Random(i).randint(0, 2**31 - 1)
            image, mask = pixels[(i, flip, seed)], masks[(i, flip, seed)]
            assert mask.shape == (1, *split.sizes[i])
            torch.testing.assert_close(mask[0] * 2 - 1, image[0], atol=1.5 / 255, rtol=0)
    # a missing file: the image trains on every pixel, and it is counted
    mask_path(data / "0.png").unlink()
    masks = MaskItems(split, d.resolution, d.image_column, d.center_crop, random_crop, "file")
    assert masks.unmasked == 1 and torch.equal(masks[(0, False, 0)], torch.ones(1, *split.sizes[0]))


def test_alpha_and_column_masks(tmp_path, tiny_cfg):
    import datasets

    data = _folder(tmp_path / "blocks")
    for i in range(6):  # the alpha channel is the red channel
        rgb = np.asarray(Image.open(data / f"{i}.png"))
        Image.fromarray(np.dstack([rgb, rgb[..., 0]]), "RGBA").save(data / f"{i}.png")
    cfg, split = _split(tiny_cfg, data)
    d = cfg.data
    alpha = MaskItems(split, d.resolution, d.image_column, d.center_crop, False, "alpha")
    files = MaskItems(split, d.resolution, d.image_column, d.center_crop, False, "file")
    for i in range(6):
        torch.testing.assert_close(alpha[(i, True, 0)], files[(i, True, 0)], atol=1.5 / 255, rtol=0)
    # a dataset with an image column of masks
    ds = datasets.Dataset.from_dict({"image": [str(data / f"{i}.png") for i in range(6)],
                                     "text": ["blocks"] * 6,
                                     "m": [str(mask_path(data / f"{i}.png")) for i in range(6)]})
    ds = ds.cast_column("image", datasets.Image()).cast_column("m", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg, split = _split(tiny_cfg, tmp_path / "saved")
    column = MaskItems(split, d.resolution, d.image_column, d.center_crop, False, "column", "m")
    for i in range(6):
        torch.testing.assert_close(column[(i, False, 0)], files[(i, False, 0)], atol=1.5 / 255, rtol=0)
    with pytest.raises(ValueError, match="no column data.mask_column='mask'"):
        MaskItems(split, d.resolution, d.image_column, d.center_crop, False, "column", "mask")


def test_masked_training_reads_cached_masks_that_follow_flips(tmp_path, tiny_cfg):
    data = _folder(tmp_path / "blocks", n=16)
    cfg = tiny_cfg("data.resolution=16", "data.mask_source=file", "data.random_flip=true", "train.max_steps=2",
                   "train.batch_size=4", data=data)
    run = build_run(cfg)
    source = run.sources[0]
    masks = MaskItems(run.sources[0].split, 16, "image", True, False, "file")
    plan = source.plan(0)
    batch = source.load(plan, slice(0, 4))
    assert batch["mask"].shape == (4, 1, 4, 4)  # latent size (the tiny VAE's factor 4)
    for k, (i, flip) in enumerate(zip(plan.items[:4], plan.flips[:4].tolist())):
        expected = torch.nn.functional.avg_pool2d(masks[(i, flip, 0)][None], 4)[0]
        torch.testing.assert_close(batch["mask"][k], expected, atol=1e-6, rtol=0)
    flipped = cached_posterior(source.extras["mask"].cache, [0], torch.tensor([True]))[0]
    plain = cached_posterior(source.extras["mask"].cache, [0], torch.tensor([False]))[0]
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-6, rtol=0)
    assert float(plain.std()) > 0.05  # not a constant mask
    result = train(tiny_cfg("data.resolution=16", "data.mask_source=file", "train.max_steps=2",
                            "train.batch_size=4", "name=masked", data=data))
    assert np.isfinite(result["final_loss"])
    with pytest.raises(ValueError, match="data.mask_floor"):
        train(tiny_cfg("data.mask_source=file", "data.mask_floor=1.5", "name=bad", data=data))


def test_mask_demo_data_masks_the_shape_and_not_the_noise(tmp_path, tiny_vae_dir):
    from diffusers import AutoencoderKL

    from demos.mask_demo import NOISE_MAX, background_level, masked_targets, noisy_concept_data

    data = noisy_concept_data(tmp_path / "noisy", num_images=4)
    for i in range(4):
        image = np.asarray(Image.open(data / f"{i:05d}.png"), np.float32)
        mask = np.asarray(Image.open(mask_path(data / f"{i:05d}.png"))) > 0
        assert 0.02 < mask.mean() < 0.6
        inside = image[mask].reshape(-1, 3)
        assert (np.abs(inside - [245, 140, 20]).max(1) < 3).mean() > 0.3  # the concept's orange, edges blended
        assert image[~mask].max() <= NOISE_MAX and image[~mask].std() > 20  # noise outside
    level = background_level([Image.open(data / f"{i:05d}.png") for i in range(4)])
    assert 0.35 < level < 0.6  # the max of three uniform channels over [0, 140] / 255: 0.41 on average
    assert background_level([Image.new("RGB", (32, 32))]) == 0.0
    # the check of the masked loss's targets runs on any VAE and reads both decodes
    check = masked_targets(AutoencoderKL.from_pretrained(tiny_vae_dir), num_images=4)
    assert 0 < check["latent_pixels_masked_in"] < 1 and 0 <= check["of_which_wholly_inside"] <= 1
    assert {"colour_read", "shape_read", "mean_rgb_inside"} <= check["clean"].keys() == check["masked_targets"].keys()
