"""Reconstruction metrics: closed forms, identical images, and noise making every number worse."""

import numpy as np
import pytest
import torch

from autoencoder.metrics import latent_stats
from ldm.eval.metrics import PSNR_CAP_DB, frechet_distance, psnr, ssim


def test_psnr_closed_form_and_cap():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1  # MSE 0.01 -> 20 dB
    assert psnr(x, y).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert psnr(x, x).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]


def test_ssim_identical_constant_and_noised():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    # constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.2, 0.6, 0.01 ** 2
    got = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)).item()
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    noisier = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ssim(x, noisier) < ssim(x, noisy)).all() and (ssim(x, noisy) < 0.99).all()
    assert (psnr(x, noisier) < psnr(x, noisy)).all()


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T + np.eye(4)
    mu = rng.normal(size=4)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)
    # diagonal covariances: sum (m1-m2)² + sum (s1 + s2 - 2 sqrt(s1 s2))
    s1, s2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    expect = 1.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance([0, 0], np.diag(s1), [1, 0], np.diag(s2)) == pytest.approx(expect)


def test_latent_stats():
    z = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), -1.0)])[None].repeat(3, 1, 1, 1)  # (3, 2, 2, 2)
    s = latent_stats(z)
    assert s["channel_mean"] == [1.0, -1.0] and s["channel_std"] == [0.0, 0.0]
