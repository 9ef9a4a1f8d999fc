"""Image-to-image and inpainting with a text-to-image latent diffusion model, as diffusers' pipelines do them.

- `LDMImg2ImgPipeline` (diffusers' ``StableDiffusionImg2ImgPipeline``): the image is encoded, noised to the
  step that ``strength`` picks (strength 1: pure noise, 0: the image itself), and denoised under the prompt
  for the remaining ``num_inference_steps * strength`` steps. Same components, arguments and random draws as
  diffusers' pipeline, which draws the same images from our folders (tested).
- `LDMInpaintPipeline` (``StableDiffusionInpaintPipeline`` with a text-to-image U-Net, 4 latent channels):
  the same start, and after every step the known region (mask 0) is put back as the image's latents noised to
  the next step, so only the masked region (mask 1, white) is drawn anew. With ``keep_unmasked`` (default)
  the decoded result takes the input's pixels outside the mask, as AUTOMATIC1111 pastes them back: the
  VAE's round trip would otherwise change them slightly.

Both share `LDMPipeline`'s components (``LDMInpaintPipeline.from_pipe(pipe)`` makes one without loading
anything), classifier-free guidance and its rescale, any scheduler, learned-variance models, LoRA scale.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from pipelines.latents import latent_scale_shift, scale_latents
from pipelines.ldm_pipeline import LDMPipeline, Sampling


def _as_batch(value, name: str, channels: int) -> torch.Tensor:
    """A PIL image, a list of them, an (H, W[, C]) or (B, H, W, C) array, or a (C, H, W) / (B, C, H, W) tensor,
    all in [0, 1] -> a float tensor (B, channels, H, W) in [0, 1]; clear errors otherwise."""
    if isinstance(value, PIL.Image.Image):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, PIL.Image.Image) for v in value):
        value = _stack_images(value, name, channels)
    if isinstance(value, np.ndarray):
        value = _array_to_tensor(value, channels)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a PIL image, a list of them, a numpy array or a torch tensor in [0, 1], "
                         f"got {type(value).__name__}")
    if value.ndim == 3:
        value = value[None]
    if value.ndim != 4 or value.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s) (B, {channels}, H, W) / (H, W"
                         f"{', 3' if channels == 3 else ''}), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must hold floats in [0, 1], got dtype {value.dtype}")
    lo, hi = float(value.min()), float(value.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return value.float()


def _stack_images(images: list, name: str, channels: int) -> np.ndarray:
    """PIL images of one size and of an RGB (``channels`` 3) or greyscale mode -> (B, H, W[, 3]) in [0, 1]."""
    modes = ("RGB",) if channels == 3 else ("L", "1")
    for v in images:
        if v.mode not in modes:
            raise ValueError(f"{name} must be a PIL image of mode {' or '.join(modes)}, got mode {v.mode!r} "
                             f"(convert it: {name}.convert({modes[0]!r}))")
    if len({v.size for v in images}) > 1:
        raise ValueError(f"{name}: all images must have one size, got {sorted({v.size for v in images})}")
    return np.stack([np.asarray(v.convert("L") if v.mode == "1" else v, dtype=np.float32) / 255.0 for v in images])


def _array_to_tensor(value: np.ndarray, channels: int) -> torch.Tensor:
    """(H, W), (H, W, C), (B, H, W) or (B, H, W, C) -> a (B, C, H, W) tensor (the channels last in the array)."""
    value = torch.from_numpy(np.ascontiguousarray(value))
    if value.ndim == 2:
        return value[None, None]
    if value.ndim == 3:
        return value[None].permute(0, 3, 1, 2) if value.shape[-1] == channels else value[:, None]
    if value.ndim == 4:
        return value.permute(0, 3, 1, 2)
    return value


class _FromImage(LDMPipeline):
    """What image-to-image and inpainting share: checked inputs, the start step that ``strength`` picks, and the
    image's latents drawn as diffusers draws them."""

    @staticmethod
    def _check_strength(strength) -> None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1] (1: start from pure noise), got {strength!r}")

    def _start(self, scheduler, num_inference_steps: int, strength: float, device) -> int:
        """Index into ``scheduler.timesteps`` of the first step to run (diffusers' ``get_timesteps``)."""
        scheduler.set_timesteps(num_inference_steps, device=device)
        init = min(int(num_inference_steps * strength), num_inference_steps)
        return max(num_inference_steps - init, 0) * scheduler.order

    def _encode_image(self, x: torch.Tensor, batch: int, generator, device) -> torch.Tensor:
        """Scaled latents (batch, C, h, w) of images in [0, 1]: a posterior sample drawn from ``generator`` (one
        per image when it is a list), as diffusers' img2img and inpaint pipelines draw it."""
        x = x.to(device, self.unet.dtype if self.vae is None else self.vae.dtype) * 2 - 1
        if self.vae is None:  # pixel space: the image is the sample
            z = x
        else:
            if isinstance(generator, list):
                x = x.expand(batch, -1, -1, -1) if len(x) == 1 else x
                z = torch.cat([self.vae.encode(x[i:i + 1]).latent_dist.sample(generator[i]) for i in range(batch)])
            else:
                z = self.vae.encode(x).latent_dist.sample(generator)
            z = scale_latents(z, *latent_scale_shift(self.vae))
        if len(z) != batch:
            z = z.repeat(batch // len(z), 1, 1, 1)
        return z.to(self.unet.dtype)

    def _image(self, image) -> torch.Tensor:
        """``image`` as a (B, 3, H, W) tensor in [0, 1], its size a multiple of the VAE's factor."""
        x = _as_batch(image, "image", 3)
        height, width = x.shape[-2:]
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"image size must be a multiple of {f} (the VAE's factor), got {width}x{height}")
        return x

    def _prepare(self, prompt, negative_prompt, image, strength, **settings) -> tuple[Sampling, torch.Tensor]:
        """The call's checked `Sampling` (``settings``: its fields by name) and image (B or 1, 3, H, W)."""
        self._check_strength(strength)
        x = self._image(image)
        s = self._sampling(prompt, negative_prompt, *x.shape[-2:], **settings)
        self._check_count(x, "image", "images", s.batch)
        return s, x

    @staticmethod
    def _check_count(value: torch.Tensor, name: str, what: str, batch: int) -> None:
        if len(value) not in (1, batch):
            raise ValueError(f"{name} holds {len(value)} {what}; give 1 or one per generated image ({batch})")

    def _run(self, s: Sampling, x: torch.Tensor, strength: float, mask: torch.Tensor | None = None,
             keep_unmasked: bool = True):
        """Images drawn from ``x`` (B or 1, 3, H, W) in [0, 1], noised to ``strength``; under ``mask`` (1: draw
        anew) the rest follows the image at every step (inpainting)."""
        scheduler, pass_variance = self._sampling_scheduler()
        device = self._execution_device
        context = self._context(s, device)
        start = self._start(scheduler, s.num_inference_steps, strength, device)
        timesteps = scheduler.timesteps[start:]
        image_latents = self._encode_image(x, s.batch, s.generator, device)
        noise = randn_tensor(image_latents.shape, generator=s.generator, device=device, dtype=image_latents.dtype)
        if mask is not None and strength == 1.0:  # diffusers' inpainting starts from pure noise at full strength
            latents = noise * scheduler.init_noise_sigma
        elif len(timesteps):
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(s.batch))
        else:
            latents = image_latents
        after_step = None
        if mask is not None:
            f = self.vae_scale_factor
            keep = 1 - F.interpolate(mask, size=(s.height // f, s.width // f)).to(device, latents.dtype)

            def after_step(i, latents):  # the known region: the image's latents at the next step's noise level
                known = image_latents
                if i < len(timesteps) - 1:
                    known = scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
                return keep * known + (1 - keep) * latents

        if len(timesteps):
            latents = self._denoise(latents, scheduler, pass_variance, context, s, start=start, after_step=after_step)
        images = self._images(latents, x, mask if keep_unmasked else None, s.output_type)
        self.maybe_free_model_hooks()
        return images

    def _images(self, latents, x: torch.Tensor, mask: torch.Tensor | None, output_type: str):
        """The decoded images; under ``mask`` only its region comes from the latents, the rest is ``x``'s pixels."""
        if mask is None or output_type == "latent":
            return self._decode(latents, output_type)
        decoded = self._decode(latents, "pt")
        m = mask.to(decoded.device, decoded.dtype)
        decoded = m * decoded + (1 - m) * x.to(decoded.device, decoded.dtype)
        return self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=[False] * len(decoded))


class LDMImg2ImgPipeline(_FromImage):
    """Text-guided image-to-image (SDEdit; diffusers' ``StableDiffusionImg2ImgPipeline``): ``image`` (PIL, array
    or tensor in [0, 1]; its size sets the output's) noised to ``strength`` and denoised under the prompt."""

    task = "img2img"

    @torch.no_grad()
    def __call__(self, prompt, image, strength=0.8, negative_prompt=None, num_inference_steps=50,
                 guidance_scale=7.5, num_images_per_prompt=1, generator=None, output_type="pil", return_dict=True,
                 cross_attention_kwargs=None, guidance_rescale=0.0):
        s, x = self._prepare(prompt, negative_prompt, image, strength, num_images_per_prompt=num_images_per_prompt,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             guidance_rescale=guidance_rescale, generator=generator, output_type=output_type,
                             cross_attention_kwargs=cross_attention_kwargs)
        images = self._run(s, x, strength)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class LDMInpaintPipeline(_FromImage):
    """Text-guided inpainting with a text-to-image model (diffusers' ``StableDiffusionInpaintPipeline`` on a
    4-channel U-Net): ``mask_image`` (L-mode PIL, or array/tensor in [0, 1], the image's size; white = draw
    anew) picks the region; the rest follows the image at every step (module docstring)."""

    task = "inpaint"

    @torch.no_grad()
    def __call__(self, prompt, image, mask_image, strength=1.0, negative_prompt=None, num_inference_steps=50,
                 guidance_scale=7.5, num_images_per_prompt=1, generator=None, output_type="pil", return_dict=True,
                 cross_attention_kwargs=None, guidance_rescale=0.0, keep_unmasked=True):
        s, x = self._prepare(prompt, negative_prompt, image, strength, num_images_per_prompt=num_images_per_prompt,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             guidance_rescale=guidance_rescale, generator=generator, output_type=output_type,
                             cross_attention_kwargs=cross_attention_kwargs)
        mask = _as_batch(mask_image, "mask_image", 1)
        if mask.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"mask_image size {mask.shape[-1]}x{mask.shape[-2]} must equal the image's "
                             f"{s.width}x{s.height}")
        self._check_count(mask, "mask_image", "masks", s.batch)
        mask = (mask >= 0.5).float()  # white (1): draw anew; black (0): keep, as diffusers binarises it
        images = self._run(s, x, strength, mask, keep_unmasked)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
