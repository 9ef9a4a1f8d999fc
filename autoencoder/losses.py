"""Autoencoder losses as small named pieces; each returns a scalar tensor."""

from __future__ import annotations

import torch


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0,
                        l2_weight: float = 0.0) -> torch.Tensor:
    """Weighted sum of mean absolute and mean squared error over all pixels."""
    diff = recon.float() - target.float()
    return l1_weight * diff.abs().mean() + l2_weight * diff.square().mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent dims and averaged over the batch."""
    kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float())
    return kl.flatten(1).sum(1).mean()


# ---- adversarial terms (Esser et al. 2021, "Taming Transformers"; Rombach et al. 2022, LDM) ----------

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ½(E[relu(1 - D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator non-saturating (logistic) loss: ½(E[softplus(-D(x))] + E[softplus(D(x̂))])."""
    return 0.5 * (torch.nn.functional.softplus(-logits_real).mean() + torch.nn.functional.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The autoencoder's adversarial term: -E[D(x̂)] for hinge, E[softplus(-D(x̂))] (non-saturating) for vanilla."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "vanilla":
        return torch.nn.functional.softplus(-logits_fake).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; valid: {sorted(D_LOSSES)}")


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """λ = ||∇_L rec|| / (||∇_L g|| + eps) at the decoder's last layer L, clamped to [0, max_weight] and
    detached: it balances the two gradients there (Esser et al. 2021, eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + eps)).clamp(0.0, max_weight).detach()


class PatchDiscriminator(torch.nn.Module):
    """PatchGAN (Isola et al. 2017): strided convolutions giving one real/fake logit per image patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(in_channels, channels, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [torch.nn.Conv2d(ch, out, 4, stride, 1, bias=False), torch.nn.BatchNorm2d(out),
                       torch.nn.LeakyReLU(0.2)]
            ch = out
        layers.append(torch.nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = torch.nn.Sequential(*layers)
        for m in self.modules():  # DCGAN initialisation, as in pix2pix/taming
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.normal_(m.weight, 1.0, 0.02)
                torch.nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w) patch logits
