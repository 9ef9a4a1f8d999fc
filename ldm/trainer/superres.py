"""Super-resolution stages of a cascade (Ho et al. 2022, "Cascaded Diffusion Models"), ``stage:
super_resolution``: the stage (`SuperResolution`: its settings, U-Net, arrays, pipeline and export), the objective
that trains it, and the low-resolution images it is conditioned on.

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
from PIL import Image

from ldm.data.batches import CachedArrays, PixelItems
from ldm.data.cache import CachePlace, Encoding, Fingerprint, cached_posterior, latent_cache
from ldm.data.images import downsample
from ldm.engine.config import Checker
from ldm.engine.records import make_grid
from ldm.models.vae import is_pixel_space
from ldm.trainer.objective import LatentDiffusionObjective, ObjectiveInputs
from ldm.trainer.stage import TextToImage, cache_place
from ldm.trainer.validation import ValidationSet
from pipelines import low_res_scheduler
from pipelines.latents import vae_scale_factor
from pipelines.sr_pipeline import IMAGE_CHANNELS, NUM_NOISE_LEVELS, condition_image

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


def low_res_cache(pixel_items, split, factor: int, place: CachePlace, flips: bool) -> dict:
    """The low-resolution images of ``split`` in [-1, 1], as a posterior cache whose "mean" is the image (and
    whose std is zero): read with `ldm.data.cache.cached_posterior`."""
    key = Fingerprint().value(["low-res-area-v1", factor]).hexdigest()

    def encode(pixels):
        low = downsample(pixels.float(), factor)
        return low, torch.zeros_like(low)

    return latent_cache(Encoding(encode, key, IMAGE_CHANNELS, factor), split, pixel_items, place, flips)


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


@torch.no_grad()
def super_resolution_grid(pipe, low_res: torch.Tensor, captions: list[str], seed: int, num_inference_steps: int,
                          guidance_scale: float, noise_level: int) -> Image.Image:
    """Two rows: the low-resolution inputs (V, 3, h, w) in [-1, 1], enlarged, over the stage's outputs."""
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(low_res))]
    out = pipe(captions, image=(low_res + 1) / 2, generator=gens, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, noise_level=noise_level).images
    inputs = [im.resize(out[0].size, Image.Resampling.NEAREST) for im in
              pipe.image_processor.postprocess((low_res / 2 + 0.5).clamp(0, 1), do_denormalize=[False] * len(low_res))]
    return make_grid(inputs + out, ncols=len(low_res))


class SuperResolution(TextToImage):
    """A super-resolution stage: the U-Net takes, beside x_t, the low-resolution image (3 more input channels) and
    its augmentation level (a class embedding per level of the low-resolution schedule); batches carry the
    low-resolution images as ``low_res``; it samples and exports as a `pipelines.SuperResolutionPipeline` that
    diffusers' ``StableDiffusionUpscalePipeline`` loads. Its samples are scored by ``make cascade-demo`` on a base
    model's samples, not by validation."""

    scored = False
    streams = False  # its low-resolution images are not streamed yet
    GRID_IMAGES = 8  # the validation grid upscales this many validation images

    def __init__(self, cfg):
        super().__init__(cfg)
        sr = cfg.super_resolution
        self.upscale_factor = cfg.data.resolution // sr.low_resolution
        self.max_noise_level = sr.noise_levels[1]  # exported as the pipeline's

    @classmethod
    def check(cls, c: Checker) -> None:
        """A super-resolution stage's settings, and what it does not combine with."""
        cfg = c.cfg
        sr, d = cfg.super_resolution, cfg.data
        c.at_least("super_resolution.low_resolution", 1)
        c.require(d.resolution % sr.low_resolution == 0 and d.resolution > sr.low_resolution,
                  "super_resolution.low_resolution", f"must divide data.resolution={d.resolution} and be smaller")
        factor = d.resolution // sr.low_resolution
        c.require(len(sr.noise_levels) == 2 and 0 <= sr.noise_levels[0] <= sr.noise_levels[1] <= 999,
                  "super_resolution.noise_levels", "needs [low, high] with 0 <= low <= high <= 999 (steps of the "
                  "1000-step low-resolution schedule); [0, 0] turns augmentation off")
        c.require(len(sr.blur_sigma) == 2 and all(math.isfinite(v) for v in sr.blur_sigma)
                  and 0 <= sr.blur_sigma[0] <= sr.blur_sigma[1], "super_resolution.blur_sigma",
                  "needs [low, high] with 0 <= low <= high (low-resolution pixels); [0, 0] turns blur off")
        c.require(0 <= sr.sample_noise_level <= 999, "super_resolution.sample_noise_level", "needs an int in [0, 999]")
        if sr.train_crop is not None:
            multiple = factor * 2 ** (len(cfg.model.unet.block_out_channels) - 1)
            c.require(0 < sr.train_crop <= d.resolution and sr.train_crop % multiple == 0,
                      "super_resolution.train_crop",
                      f"must be at most data.resolution={d.resolution} and a multiple of {multiple} (the upscaling "
                      f"factor {factor} times the U-Net's downsampling 2^(len(model.unet.block_out_channels) - 1)); "
                      "null trains on whole images")
        c.require(not d.bucketing or d.bucket_step % factor == 0, "data.bucket_step",
                  f"must be a multiple of the upscaling factor {factor} (data.resolution / "
                  "super_resolution.low_resolution)")
        cls.check_combinations(c)

    @staticmethod
    def check_combinations(c: Checker) -> None:
        """What a super-resolution stage does not combine with."""
        cfg = c.cfg
        c.require(cfg.finetune.method == "full", "finetune.method", "a super-resolution stage trains all its "
                  "weights: use 'full'")
        db = cfg.dreambooth
        c.require(not (db.instance_data or db.class_prompt or db.class_prompts), "dreambooth.instance_data",
                  "DreamBooth is for text-to-image stages; unset dreambooth.* for stage=super_resolution")
        c.require(cfg.data.mask_source == "none", "data.mask_source", "a masked loss is for base models (stage=base)")
        c.require(not cfg.model.vae_tiling or cfg.model.vae != "none", "model.vae_tiling",
                  "is for latent super-resolution stages (stage=super_resolution with a VAE)")

    def unet_inputs(self, latent_channels: int) -> dict:
        return {"in_channels": latent_channels + IMAGE_CHANNELS, "num_class_embeds": NUM_NOISE_LEVELS}

    def check_unet(self, unet, vae, where: str) -> None:
        """The U-Net takes latents + 3 image channels and a class embedding per noise level; in latent space the
        VAE's factor is the upscaling factor."""
        want = vae.config.latent_channels + IMAGE_CHANNELS
        if unet.config.in_channels != want or (unet.config.num_class_embeds or 0) < NUM_NOISE_LEVELS:
            raise ValueError(f"{where}: a super-resolution U-Net needs in_channels={want} (latents + the "
                             f"low-resolution image) and num_class_embeds >= {NUM_NOISE_LEVELS}, got "
                             f"{unet.config.in_channels} and {unet.config.num_class_embeds}")
        if not is_pixel_space(vae) and vae_scale_factor(vae) != self.upscale_factor:
            raise ValueError(f"a latent super-resolution stage puts the low-resolution image at latent size, so "
                             f"data.resolution / super_resolution.low_resolution ({self.upscale_factor}) must be "
                             f"the VAE's factor {vae_scale_factor(vae)}")

    def size_multiple(self, vae) -> int:
        """Sizes map to whole latents and to whole low-resolution pixels."""
        return max(vae_scale_factor(vae), self.upscale_factor)

    def low_res_cache(self, engine, split, flips: bool) -> dict:
        return low_res_cache(PixelItems.for_split(split, self.cfg.data), split, self.upscale_factor,
                             cache_place(self.cfg, engine), flips)

    def arrays(self, engine, split, flips: bool) -> dict[str, CachedArrays]:
        """The conditioning images, stored beside the latents (without a cache they are downsampled each step)."""
        return {"low_res": CachedArrays(self.low_res_cache(engine, split, flips))}

    def validation_arrays(self, engine, split) -> dict:
        """The low-resolution versions (V, 3, h, w) in [-1, 1] of the validation images."""
        cache = self.low_res_cache(engine, split, flips=False)
        return {"low_res": cached_posterior(cache, list(range(len(split))), torch.zeros(len(split), dtype=torch.bool))[0]}

    def objective(self, comp, diffusion, text, gather) -> SuperResolutionObjective:
        cfg = self.cfg
        sr = cfg.super_resolution
        return SuperResolutionObjective(diffusion, cfg.diffusion, cfg.data.caption_dropout, text, comp.vae,
                                        gather=gather, factor=self.upscale_factor, noise_levels=sr.noise_levels,
                                        blur_sigma=sr.blur_sigma, crop=sr.train_crop)

    def pipeline(self, comp, unet, text_encoder, scheduler):
        from pipelines import SuperResolutionPipeline

        pixels = is_pixel_space(comp.vae)
        return SuperResolutionPipeline(vae=None if pixels else comp.vae, text_encoder=text_encoder,
                                       tokenizer=comp.tokenizer, unet=unet, low_res_scheduler=low_res_scheduler(),
                                       scheduler=scheduler, max_noise_level=self.max_noise_level,
                                       upscale_factor=self.upscale_factor if pixels else None,
                                       vae_tiling=bool(getattr(comp.vae, "use_tiling", False)))

    def for_export(self, pipe):
        """diffusers' upscaler decodes with its fixed factor: the VAE is carried with its latent space rescaled to
        it (an exact reparametrisation: the same scaled latents, the same images)."""
        if pipe.vae is not None:
            from pipelines import rescale_latent_space

            pipe.register_modules(vae=rescale_latent_space(pipe.vae))
        return pipe

    def sample_grid(self, pipe, prompts: list[str], data: ValidationSet, sample) -> Image.Image:
        """The first validation images' low-resolution versions over the stage's upscales of them."""
        k = self.GRID_IMAGES
        return super_resolution_grid(pipe, data.arrays["low_res"][:k], data.captions[:k], sample.seeds[0],
                                     sample.num_inference_steps, sample.guidance_scale,
                                     self.cfg.super_resolution.sample_noise_level)
