"""Super-resolution stages of a cascade (Ho et al. 2022, "Cascaded Diffusion Models"): the objective that trains
one, and the low-resolution images it is conditioned on.

Each training image (data.resolution) is area-downsampled to ``super_resolution.low_resolution``: stored beside
the latents in a cache of its own, or derived per step when the images are not cached (random crops). Per
example, a blur sigma and a noise level are drawn (conditioning augmentation); the low-resolution image is
blurred, then noised by the low-resolution schedule at that level (`pipelines.low_res_scheduler`, as diffusers'
upscaler does at sampling), and concatenated to x_t at latent size (latent stages) or upsampled to the image
size (pixel stages); the level goes to the U-Net as ``class_labels``.

With ``super_resolution.train_crop`` a step trains on random crops (as CDM and Imagen train their SR stages): the
crop is cut from the cached latents and the low-resolution image at the same place (corners on the grid where
both start), so the cache holds whole images and a step costs about (crop / resolution)² of a whole one.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from pipelines import low_res_scheduler
from pipelines.sr_pipeline import IMAGE_CHANNELS, condition_image

from ldm.data.cache import Fingerprint, latent_cache
from ldm.trainer.objective import LatentDiffusionObjective, ObjectiveInputs
from ldm.data.images import downsample

SR_DRAWS_SALT = 0x5E5  # the augmentation draws of a step come from their own generator: the base draws are unchanged


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur image i of ``x`` (B, C, H, W) with a Gaussian of std ``sigma[i]`` pixels (0: unchanged); separable,
    edges replicated, kernel radius ceil(3 sigma)."""
    radius = int(math.ceil(3 * float(sigma.max()))) if len(sigma) else 0
    if radius == 0:
        return x
    b, c, h, w = x.shape
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    s = sigma.double().clamp_min(1e-6)[:, None]
    kernel = torch.exp(-k[None] ** 2 / (2 * s ** 2))
    kernel[sigma == 0] = (k == 0).double()
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)  # (B·C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def low_res_cache(pixel_items, split, factor: int, cache_dir, accelerator, flips: bool, num_workers: int = 0) -> dict:
    """The low-resolution images of ``split`` in [-1, 1], as a posterior cache whose "mean" is the image (and
    whose std is zero): read with `ldm.data.cache.cached_posterior`."""
    key = Fingerprint().value(["low-res-area-v1", factor]).hexdigest()

    def encode(pixels):
        low = downsample(pixels.float(), factor)
        return low, torch.zeros_like(low)

    return latent_cache(encode, key, split, pixel_items, IMAGE_CHANNELS, factor, cache_dir, accelerator, flips,
                        num_workers)


class SuperResolutionObjective(LatentDiffusionObjective):
    """Latent (or pixel) diffusion of the high-resolution image under text context and the augmented
    low-resolution image (module docstring). Everything of `LatentDiffusionObjective` holds: prediction types,
    learned variance and the bound, min-SNR weighting, timestep sampling, offset noise, the posterior mean or a
    sample, caption dropout."""

    def __init__(self, *args, factor: int, noise_levels: tuple[int, int], blur_sigma: tuple[float, float],
                 crop: int | None = None, **kwargs):
        """``crop``: train on random crops of this side (pixels; module docstring), or whole images."""
        super().__init__(*args, **kwargs)
        self.sr_factor, self.noise_levels, self.blur_sigma = factor, tuple(noise_levels), tuple(blur_sigma)
        self.crop = crop
        self.low_res_scheduler = low_res_scheduler()

    def crop_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size if self.crop is None else (min(self.crop, size[0]), min(self.crop, size[1]))

    def draw(self, plan) -> dict:
        """The base draws (at the crop's size), and per example the augmentation level (B,), its noise
        (B, 3, h, w), a blur sigma and, when cropping, the crop's top-left corner (B, 2) in pixels, on the grid
        where latent and low-resolution pixels both start."""
        full = plan.size
        plan = dataclasses.replace(plan, size=self.crop_size(full))
        draws = super().draw(plan)
        g = torch.Generator().manual_seed((plan.draws_seed + SR_DRAWS_SALT) % (2**63 - 1))
        n, (h, w) = len(plan), plan.size
        lo, hi = self.noise_levels
        draws["levels"] = torch.randint(lo, hi + 1, (n,), generator=g)
        draws["aug_noise"] = torch.randn((n, IMAGE_CHANNELS, h // self.sr_factor, w // self.sr_factor), generator=g)
        a, b = self.blur_sigma
        draws["blur"] = a + (b - a) * torch.rand(n, generator=g)
        if self.crop is not None:
            step = math.lcm(self.factor, self.sr_factor)
            rows = torch.randint(0, (full[0] - h) // step + 1, (n,), generator=g)
            cols = torch.randint(0, (full[1] - w) // step + 1, (n,), generator=g)
            draws["corner"] = torch.stack([rows, cols], 1) * step
        return draws

    def cut(self, batch: dict, corners: torch.Tensor) -> dict:
        """The crops of a loaded batch: each image's latents, low-resolution image or pixels cut at its corner."""
        scale = {"mean": self.factor, "std": self.factor, "low_res": self.sr_factor, "pixels": 1}
        out = dict(batch)
        for key, f in scale.items():
            if key in batch:
                x = batch[key]
                h, w = (s // f for s in self.crop_size((x.shape[-2] * f, x.shape[-1] * f)))
                out[key] = torch.stack([x[i, :, r // f:r // f + h, c // f:c // f + w]
                                        for i, (r, c) in enumerate(corners.tolist())])
        return out

    def augment(self, low: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor,
                blur: torch.Tensor | None = None) -> torch.Tensor:
        """Blur, then noise the low-resolution images to their levels; at the U-Net's input size."""
        if blur is not None:
            low = gaussian_blur(low, blur.to(low.device))
        noised = self.low_res_scheduler.add_noise(low, noise.to(low.device), levels.to(low.device))
        size = (low.shape[-2] * self.sr_factor // self.factor, low.shape[-1] * self.sr_factor // self.factor)
        return condition_image(noised, size)

    def inputs(self, batch: dict, draws: dict, sl: slice, device) -> ObjectiveInputs:
        """The base inputs, with the augmented low-resolution image (``image``) and its level (``noise_level``) as
        conditions."""
        if "corner" in draws:
            batch = self.cut(batch, draws["corner"][sl])
        inputs = super().inputs(batch, draws, sl, device)
        low = batch["low_res"] if "low_res" in batch else downsample(batch["pixels"].float(), self.sr_factor)
        cond = self.augment(low.to(device), draws["levels"][sl], draws["aug_noise"][sl], draws["blur"][sl])
        inputs.conditions.update(image=cond, noise_level=draws["levels"][sl].to(device))
        return inputs

    def network(self, unet, inputs: ObjectiveInputs):
        cond, levels = inputs.conditions["image"], inputs.conditions["noise_level"]
        return lambda x, t: unet(torch.cat([x, cond.to(x.dtype)], dim=1), t, encoder_hidden_states=inputs.context,
                                 class_labels=levels).sample

    def validation_inputs(self, mean: torch.Tensor, std: torch.Tensor, seed: int, arrays: dict) -> ObjectiveInputs:
        """The base validation inputs, conditioned on the low-resolution images ``arrays["low_res"]`` (V, 3, h, w)
        at levels spread evenly over the training range, their noise from ``seed``; no blur."""
        inputs = super().validation_inputs(mean, std, seed, arrays)
        low = arrays["low_res"]
        g = torch.Generator().manual_seed(seed + SR_DRAWS_SALT)
        lo, hi = self.noise_levels
        levels = torch.linspace(lo, hi, len(low)).round().long()
        inputs.conditions.update(image=self.augment(low.float(), levels, torch.randn(low.shape, generator=g)),
                                 noise_level=levels)
        return inputs
