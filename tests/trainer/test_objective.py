"""The objective, the batch source and the engine, tested by their effects: offset noise shifts each
(image, channel)'s noise by a constant; logit-normal timesteps follow their density; two accumulated
half-batches give the gradient of one full batch; the exported EMA weights are not the raw ones; a bucket
smaller than the batch is reported."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ZeroText

from ldm.data.batches import Plan
from ldm.diffusion.gaussian import GaussianDiffusion, make_betas
from ldm.diffusion.timesteps import make_timestep_sampler
from ldm.trainer.config import DiffusionConfig
from ldm.trainer.objective import LatentDiffusionObjective
from ldm.trainer.train import build_run, train


class _VAEConfig:
    scaling_factor, shift_factor, latent_channels, block_out_channels = 1.0, None, 4, [8, 16, 16]


class _VAE:
    config = _VAEConfig()


def _draws(offset_noise: float, n: int = 512) -> dict:
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    objective = LatentDiffusionObjective(diffusion, DiffusionConfig(offset_noise=offset_noise), 0.1, None, _VAE())
    plan = Plan(list(range(n)), (32, 32), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool),
                torch.zeros(n, dtype=torch.long), draws_seed=123)
    return objective.draw(plan)


def test_offset_noise_shifts_each_channel_by_a_constant():
    plain, offset = _draws(0.0), _draws(0.5)
    # The same seed draws the same base noise; the offset adds one constant per (image, channel).
    shift = offset["noise"] - plain["noise"]  # (n, 4, 8, 8)
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(shift, per_channel.expand_as(shift), rtol=0, atol=1e-6)
    assert abs(float(per_channel.std()) - 0.5) < 0.03  # 0.5 * N(0, 1): std 0.5 over 2048 draws
    # So the per-(image, channel) noise mean spreads far more than white noise's 1/8.
    assert abs(float(plain["noise"].mean(dim=(2, 3)).std()) - 1 / 8) < 0.01
    assert float(offset["noise"].mean(dim=(2, 3)).std()) > 0.45
    for key in ("t", "posterior", "drop"):
        assert torch.equal(plain[key], offset[key])
    assert 0.07 < float(plain["drop"].float().mean()) < 0.13  # caption dropout at 0.1


class _ScaledVAEConfig(_VAEConfig):
    scaling_factor, shift_factor = 0.5, 0.25


class _ScaledVAE:
    config = _ScaledVAEConfig()


@pytest.mark.parametrize("posterior", ["sample", "mean"])
def test_latent_posterior_picks_a_fresh_sample_or_the_mean(posterior):
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    objective = LatentDiffusionObjective(diffusion, DiffusionConfig(latent_posterior=posterior), 0.0,
                                         ZeroText(), _ScaledVAE())
    n = 6
    plan = Plan(list(range(n)), (32, 32), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool),
                torch.zeros(n, dtype=torch.long), draws_seed=7)
    draws = objective.draw(plan)
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(n, 4, 8, 8, generator=g), torch.rand(n, 4, 8, 8, generator=g) + 0.1
    z0 = objective.inputs({"mean": mean, "std": std, "captions": ["a"] * n}, draws, slice(0, n), "cpu").latents
    expected = mean + std * draws["posterior"] if posterior == "sample" else mean
    torch.testing.assert_close(z0, (expected - 0.25) * 0.5)


def test_logit_normal_timesteps_follow_their_density():
    g = torch.Generator().manual_seed(0)
    T, n, mean, std = 1000, 200_000, 0.5, 1.0
    t, weights = make_timestep_sampler("logit_normal", T, mean, std).sample(n, g)
    assert torch.equal(weights, torch.ones(n))  # the density is the point: no reweighting
    # t = floor(T u) with logit(u) ~ N(mean, std²): P(t < k) = Φ((logit(k/T) - mean) / std).
    edges = np.arange(0, T + 1, 50)
    observed = np.histogram(t.numpy(), bins=edges)[0] / n

    def cdf(k):
        if k <= 0:
            return 0.0
        if k >= T:
            return 1.0
        z = (math.log(k / T / (1 - k / T)) - mean) / std
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    expected = np.diff([cdf(k) for k in edges])
    assert np.abs(observed - expected).max() < 0.003, np.c_[observed, expected]
    u, weights = make_timestep_sampler("uniform", T).sample(100_000, g)
    assert torch.equal(weights, torch.ones(100_000))
    assert u.min() == 0 and u.max() == T - 1
    assert np.abs(np.histogram(u.numpy(), bins=edges)[0] / 100_000 - 0.05).max() < 0.003
    with pytest.raises(ValueError, match="timestep_sampling"):
        make_timestep_sampler("cosine", T)


def _grads_of_first_step(cfg) -> dict:
    run = build_run(cfg)
    _, _, batch = next(iter(run.sources[0].iterate(0, 1)))
    terms = run.step(0, batch)
    unet = run.engine.accelerator.unwrap_model(run.unet)
    return {"terms": {k: float(v) for k, v in terms.items()},
            "grads": {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}}


def test_two_accumulated_half_batches_equal_one_full_batch(tiny_cfg):
    """Same step, same global batch of 16: one forward of 16, or two of 8 whose gradients add up (with
    gradient checkpointing on, which must not change them either)."""
    full = _grads_of_first_step(tiny_cfg("name=full", "train.max_steps=1"))
    halves = _grads_of_first_step(tiny_cfg("name=halves", "train.max_steps=1", "train.gradient_accumulation_steps=2",
                                           "train.gradient_checkpointing=true"))
    assert full["grads"].keys() == halves["grads"].keys() and len(full["grads"]) > 10
    for name, g in full["grads"].items():
        torch.testing.assert_close(halves["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert halves["terms"]["loss"] == pytest.approx(full["terms"]["loss"], rel=1e-5)


def test_exported_ema_weights_are_not_the_raw_ones(tiny_cfg):
    cfg = tiny_cfg("name=ema", "train.max_steps=4", "train.ema_decay=0.5", "train.ema_warmup=false",
                   "train.checkpoint_every=4")
    train(cfg)
    raw = load_file(cfg.run_dir / "checkpoints" / "step-4" / "model.safetensors")  # the trained U-Net
    exported = load_file(cfg.run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert raw.keys() == exported.keys()
    moved = [k for k in raw if not torch.equal(raw[k], exported[k])]
    assert len(moved) > len(raw) // 2, f"only {len(moved)} of {len(raw)} tensors differ"


def test_buckets_smaller_than_a_batch_are_reported():
    from ldm.data.splits import Split

    split = Split(ds=list(range(21)), captions=[], caption_start=np.zeros(22), sizes=[], groups=[0] * 16 + [1] * 5,
                  buckets=[(32, 32), (24, 40)], fingerprint="")
    assert split.unseen_buckets(8) == {"24x40": 5}
    assert split.unseen_buckets(4) == {}


def test_every_timestep_sampler_has_one_interface():
    from ldm.diffusion.timesteps import TIMESTEP_SAMPLERS

    T = 10
    for name in TIMESTEP_SAMPLERS:
        sampler = make_timestep_sampler(name, T, mean=0.5, std=1.0)
        t, weights = sampler.sample(32, torch.Generator().manual_seed(0))
        assert t.shape == weights.shape == (32,) and t.dtype == torch.long and weights.dtype == torch.float32
        assert int(t.min()) >= 0 and int(t.max()) < T
        sampler.update(t, torch.rand(32))  # only a loss-aware sampler keeps what it is shown
        assert sampler.checkpointed == hasattr(sampler, "state_dict")


def test_a_batch_source_carries_extra_arrays_by_name():
    """Any per-image array travels beside the latents under its name, sliced and mirrored with its image."""
    from ldm.data.batches import TRAIN_STREAMS, BatchSource, CachedArrays, CutArrays, GlobalBatchSampler

    class _Split:
        sizes, groups = [(8, 8)] * 8, None

        def __len__(self):
            return 8

        def caption_index(self, items, u):
            return torch.as_tensor(items)

    latents = {"rows": np.arange(8), "groups": np.zeros(8, dtype=np.int64),
               "mean_0": np.arange(8 * 4 * 2 * 2, dtype=np.float32).reshape(8, 4, 2, 2)}
    latents.update(std_0=np.zeros_like(latents["mean_0"]), mean_flip_0=-latents["mean_0"],
                   std_flip_0=np.zeros_like(latents["mean_0"]))
    depth = {**latents, "mean_0": latents["mean_0"][:, :1] + 1000, "mean_flip_0": -latents["mean_0"][:, :1] - 1000}
    class _Labels(torch.utils.data.Dataset):  # keyed (index, flip, crop seed), as PixelItems and MaskItems are
        def __getitem__(self, key):
            return torch.full((1, 8, 8), float(key[0]))

    cut = CutArrays(_Labels())
    source = BatchSource(_Split(), GlobalBatchSampler(None, 8, 4, seed=0), 0, TRAIN_STREAMS, random_flip=True,
                         latents=latents, extras={"depth": CachedArrays(depth), "label": cut})
    plan = source.plan(0)
    batch = source.load(plan, slice(1, 3))
    items, flips = plan.items[1:3], plan.flips[1:3]
    for k, (i, f) in enumerate(zip(items, flips.tolist())):
        sign = -1 if f else 1
        assert torch.equal(batch["depth"][k], sign * (torch.from_numpy(latents["mean_0"][i, :1]) + 1000))
        assert torch.equal(batch["mean"][k], sign * torch.from_numpy(latents["mean_0"][i]))
        assert torch.equal(batch["label"][k], torch.full((1, 8, 8), float(i)))
