"""Autoencoder loss pieces against values computed by hand on tiny tensors."""

import math

import pytest
import torch

from autoencoder.losses import (
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    reconstruction_loss,
    vanilla_d_loss,
)


def test_reconstruction_loss_by_hand():
    recon, target = torch.tensor([[0.5, -1.0], [2.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # |d| = 0.5, 1, 1, 0 -> mean 0.625; d^2 = 0.25, 1, 1, 0 -> mean 0.5625
    assert reconstruction_loss(recon, target, 1.0, 0.0).item() == pytest.approx(0.625)
    assert reconstruction_loss(recon, target, 0.0, 1.0).item() == pytest.approx(0.5625)
    assert reconstruction_loss(recon, target, 2.0, 4.0).item() == pytest.approx(2 * 0.625 + 4 * 0.5625)


def test_kl_loss_by_hand():
    mean = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 2 - 1 - ln 2), summed over dims, one sample
    assert kl_loss(mean, logvar).item() == pytest.approx(0.5 + 0.5 * (1 - math.log(2.0)))
    assert kl_loss(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_discriminator_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; relu(1-2)=0, relu(1+0)=1 -> 0.5; half the sum = 0.375
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expect = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.0)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expect)
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    assert generator_loss(fake, "vanilla").item() == pytest.approx((sp(2.0) + sp(0.0)) / 2)
    with pytest.raises(ValueError, match="adversarial loss"):
        generator_loss(fake, "wgan")


def test_adaptive_weight_matches_its_formula():
    torch.manual_seed(0)
    w = torch.randn(3, 3, requires_grad=True)  # stands in for the decoder's last layer
    x = torch.randn(5, 3)
    out = x @ w
    rec = out.square().mean()
    g = -(out * torch.tensor([1.0, 2.0, 3.0])).mean()
    lam = adaptive_weight(rec, g, w)
    gr = torch.autograd.grad(rec, w, retain_graph=True)[0]
    gg = torch.autograd.grad(g, w, retain_graph=True)[0]
    assert lam.item() == pytest.approx((gr.norm() / (gg.norm() + 1e-4)).item(), rel=1e-6)
    assert not lam.requires_grad
    assert adaptive_weight(rec, g * 1e-12, w, max_weight=10.0).item() == 10.0


def test_patch_discriminator_gives_patch_logits():
    d = PatchDiscriminator(3, channels=8, num_layers=2)
    logits = d(torch.randn(2, 3, 32, 32))
    assert logits.shape[0] == 2 and logits.shape[1] == 1 and logits.shape[2] > 1
