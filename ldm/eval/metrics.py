"""Distribution-level image metrics that need no download: a fixed random-feature space, the Fréchet
distance between two sets of images in it, and the diversity of images drawn for one prompt.

The feature space is defined here, by a seed: three random convolutions (ReLU, stride 2 after the first),
each scale mean-pooled (96 numbers per image), and with ``layout=True`` also the last scale pooled on a 2x2
grid (128 more), so that where things are in the image counts, not only what they look like. Distances are
comparable between runs of this project, not with published FID numbers.
"""

from __future__ import annotations

import numpy as np
import torch

FEATURE_SEED = 20240601


class FixedFeatures(torch.nn.Module):
    """Random-weight conv features at three scales (seeded, frozen): (B, 3, H, W) in [0, 1] -> (B, 96), or
    (B, 224) with ``layout`` (the last scale also pooled over the four quadrants)."""

    def __init__(self, seed: int = FEATURE_SEED, layout: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shapes = [(32, 3), (32, 32), (32, 32)]
        self.weights = [torch.randn(o, i, 3, 3, generator=g) * (2.0 / (i * 9)) ** 0.5 for o, i in shapes]
        self.layout = layout

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, h = [], x.float() * 2 - 1
        for i, w in enumerate(self.weights):
            h = torch.relu(torch.nn.functional.conv2d(h, w.to(h.device), padding=1, stride=1 if i == 0 else 2))
            feats.append(h.mean(dim=(2, 3)))  # (B, 32)
        if self.layout:
            feats.append(torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))  # (B, 32 * 4)
        return torch.cat(feats, dim=1)


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(s)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), the Fréchet distance of two Gaussians (float64).

    Tr (S1 S2)^½ is computed as the sum of square roots of the eigenvalues of the symmetric S1^½ S2 S1^½
    (same eigenvalues as S1 S2), which stays exact for the singular covariances of few samples."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    r1 = _sqrt_psd(s1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def image_frechet_distance(a: torch.Tensor, b: torch.Tensor, layout: bool = True) -> float:
    """Fréchet distance between image sets ``a`` and ``b`` (N, 3, H, W) in [0, 1] in `FixedFeatures`."""
    net = FixedFeatures(layout=layout)
    return frechet_distance(*feature_stats(net(a)), *feature_stats(net(b)))


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean RMS pixel distance over all pairs of ``images`` (N, 3, H, W) in [0, 1]: 0 when all are the same."""
    flat = images.double().flatten(1)
    n = len(flat)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {n}")
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5  # (N, N) RMS distances
    return float(d.sum() / (n * (n - 1)))


def diversity(images: torch.Tensor, groups: list) -> float:
    """Mean over groups (e.g. prompts) of the mean pairwise distance of the group's images."""
    keys = list(dict.fromkeys(groups))
    idx = {k: [i for i, g in enumerate(groups) if g == k] for k in keys}
    return float(np.mean([mean_pairwise_distance(images[idx[k]]) for k in keys]))


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float32 in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images]) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# Reconstruction quality of images in [0, 1], shape (B, C, H, W); per-image values (B,).
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; report this instead


def psnr(x: torch.Tensor, y: torch.Tensor, cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """10 log10(1 / MSE) per image, for images in [0, 1]; capped at ``cap_db``."""
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-cap_db / 10)))).float()


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, averaged over valid positions
    and channels; C1 = (0.01)^2, C2 = (0.03)^2 for a data range of 1."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    x, y = x.double(), y.double()
    ch = x.shape[1]
    w = _gaussian_window(min(window, x.shape[-1], x.shape[-2]), sigma, ch).to(x.device)

    def filt(t):
        return torch.nn.functional.conv2d(t, w, groups=ch)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()
