"""The community's objective options against independent references: input perturbation against diffusers'
add_noise, debiased estimation's weights against their float64 closed form from diffusers' alphas (one weighted
error, whatever the prediction type), the pseudo-Huber distances against their formula, and a timestep range."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion.gaussian import GaussianDiffusion, pointwise_distance
from ldm.diffusion.timesteps import make_timestep_sampler


def _pair(prediction_type="epsilon", T=100):
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, clip_sample=False)
    return sched, GaussianDiffusion.from_scheduler_config(sched.config)


def test_input_perturbation_noises_with_the_perturbed_noise_and_targets_the_plain_one():
    sched, diff = _pair()
    g = torch.Generator().manual_seed(0)
    x0, noise, xi = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([3, 20, 60, 99])
    seen = []

    def model(xt, t):
        seen.append(xt)
        return torch.zeros_like(xt)

    mse = diff.training_losses(model, x0, t, noise, input_noise=noise + 0.1 * xi)["mse"]
    torch.testing.assert_close(seen[0], sched.add_noise(x0, noise + 0.1 * xi, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mse, noise.square().flatten(1).mean(1))  # the target is the unperturbed noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_debiased_weights_are_one_over_root_snr_on_the_epsilon_error(prediction_type):
    sched, diff = _pair(prediction_type)
    ac = sched.alphas_cumprod.double().numpy()
    snr = ac / (1 - ac)
    t = torch.arange(100)
    w = diff.debiased_weights(t).double().numpy()
    to_eps = {"epsilon": 1.0, "v_prediction": snr / (snr + 1), "sample": snr}[prediction_type]
    np.testing.assert_allclose(w, to_eps / np.sqrt(np.minimum(snr, 1000)), rtol=1e-4)  # diffusers: float32
    # the weighted error of a wrong model is the same whatever the prediction type: 1/sqrt(SNR) * ||eps_hat - eps||^2
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g,
                                                                                          dtype=torch.float64)
    tt = torch.tensor([5, 30, 70, 99])
    eps_hat = noise + 0.1
    a, s = diff.sqrt_alphas_cumprod[tt].view(-1, 1, 1, 1), diff.sqrt_one_minus_alphas_cumprod[tt].view(-1, 1, 1, 1)
    xt = a * x0 + s * noise
    x0_hat = (xt - s * eps_hat) / a
    output = {"epsilon": eps_hat, "v_prediction": a * eps_hat - s * x0_hat, "sample": x0_hat}[prediction_type]
    mse = diff.training_losses(lambda x, t: output, x0, tt, noise, debiased=True)["mse"]
    expected = 0.01 / np.sqrt(np.minimum(snr[tt.numpy()], 1000))
    np.testing.assert_allclose(mse.numpy(), expected, rtol=1e-4)


def test_pseudo_huber_and_smooth_l1_follow_their_formula():
    d = torch.tensor([-3.0, -0.5, -0.01, 0.0, 0.02, 0.4, 5.0], dtype=torch.float64)
    c = 0.1
    root = np.sqrt(d.numpy() ** 2 + c * c) - c
    np.testing.assert_allclose(pointwise_distance(d, "huber", c).numpy(), 2 * c * root)
    np.testing.assert_allclose(pointwise_distance(d, "smooth_l1", c).numpy(), 2 * root)
    np.testing.assert_allclose(pointwise_distance(d, "l2").numpy(), d.numpy() ** 2)
    small = torch.tensor([1e-3], dtype=torch.float64)  # near 0 pseudo-Huber is the squared error
    assert abs(pointwise_distance(small, "huber", c).item() - small.item() ** 2) < 1e-9
    with pytest.raises(ValueError, match="is not one of"):
        pointwise_distance(d, "l1")


@pytest.mark.parametrize("name", ["uniform", "logit_normal", "importance"])
def test_a_timestep_range_confines_every_sampler(name):
    sampler = make_timestep_sampler(name, 1000, low=200, high=700)
    g = torch.Generator().manual_seed(0)
    t, w = sampler.sample(4000, g)
    assert t.min() >= 200 and t.max() < 700 and torch.isfinite(w).all()
    sampler.update(t[:64], torch.rand(64))
    if name == "uniform":  # the whole range, evenly
        counts = torch.bincount(t - 200, minlength=500).double()
        assert counts.min() > 0 and abs(counts.mean() - 8) < 1e-9
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        make_timestep_sampler(name, 1000, low=500, high=400)
