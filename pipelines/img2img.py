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

from pipelines.ldm_pipeline import LDMPipeline


def _as_batch(value, name: str, channels: int) -> torch.Tensor:
    """A PIL image, a list of them, an (H, W[, C]) or (B, H, W, C) array, or a (C, H, W) / (B, C, H, W) tensor,
    all in [0, 1] -> a float tensor (B, channels, H, W) in [0, 1]; clear errors otherwise."""
    modes = ("RGB",) if channels == 3 else ("L", "1")
    if isinstance(value, PIL.Image.Image):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, PIL.Image.Image) for v in value):
        for v in value:
            if v.mode not in modes:
                raise ValueError(f"{name} must be a PIL image of mode {' or '.join(modes)}, got mode {v.mode!r} "
                                 f"(convert it: {name}.convert({modes[0]!r}))")
        if len({v.size for v in value}) > 1:
            raise ValueError(f"{name}: all images must have one size, got {sorted({v.size for v in value})}")
        arrays = [np.asarray(v.convert("L") if v.mode == "1" else v, dtype=np.float32) / 255.0 for v in value]
        value = np.stack(arrays)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
        if value.ndim == 2:
            value = value[None, None]
        elif value.ndim == 3:
            value = value[None].permute(0, 3, 1, 2) if value.shape[-1] == channels else value[:, None]
        elif value.ndim == 4:
            value = value.permute(0, 3, 1, 2)
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
            shift = getattr(self.vae.config, "shift_factor", None)
            z = (z - (shift or 0.0)) * self.vae.config.scaling_factor
        if len(z) != batch:
            z = z.repeat(batch // len(z), 1, 1, 1)
        return z.to(self.unet.dtype)

    def _run(self, prompt, negative_prompt, image, strength, num_inference_steps, guidance_scale,
             num_images_per_prompt, generator, output_type, cross_attention_kwargs, guidance_rescale,
             mask_image=None, keep_unmasked=True):
        self._check_strength(strength)
        x = _as_batch(image, "image", 3)
        height, width = x.shape[-2:]
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"image size must be a multiple of {f} (the VAE's factor), got {width}x{height}")
        prompts, negatives = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps,
                                                guidance_scale, num_images_per_prompt, output_type, generator,
                                                guidance_rescale)
        batch = len(prompts) * num_images_per_prompt
        if len(x) not in (1, batch):
            raise ValueError(f"image holds {len(x)} images; give 1 or one per generated image ({batch})")
        mask = None
        if mask_image is not None:
            mask = _as_batch(mask_image, "mask_image", 1)
            if mask.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"mask_image size {mask.shape[-1]}x{mask.shape[-2]} must equal the image's "
                                 f"{width}x{height}")
            if len(mask) not in (1, batch):
                raise ValueError(f"mask_image holds {len(mask)} masks; give 1 or one per generated image ({batch})")
            mask = (mask >= 0.5).float()  # white (1): draw anew; black (0): keep, as diffusers binarises it
        scheduler, pass_variance = self._sampling_scheduler()
        device = self._execution_device
        context = self._context(prompts, negatives, num_images_per_prompt, guidance_scale > 1.0, device,
                                cross_attention_kwargs)
        start = self._start(scheduler, num_inference_steps, strength, device)
        timesteps = scheduler.timesteps[start:]
        image_latents = self._encode_image(x, batch, generator, device)
        noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=image_latents.dtype)
        if mask is not None and strength == 1.0:  # diffusers' inpainting starts from pure noise at full strength
            latents = noise * scheduler.init_noise_sigma
        elif len(timesteps):
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        else:
            latents = image_latents
        after_step = None
        if mask is not None:
            keep = 1 - F.interpolate(mask, size=(height // f, width // f)).to(device, latents.dtype)

            def after_step(i, latents):  # the known region: the image's latents at the next step's noise level
                known = image_latents
                if i < len(timesteps) - 1:
                    known = scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
                return keep * known + (1 - keep) * latents

        if len(timesteps):
            latents = self._denoise(latents, scheduler, pass_variance, context, num_inference_steps,
                                    guidance_scale, guidance_rescale, generator, cross_attention_kwargs,
                                    start=start, after_step=after_step)
        if mask is not None and keep_unmasked and output_type != "latent":
            decoded = self._decode(latents, "pt")
            m = mask.to(decoded.device, decoded.dtype)
            decoded = m * decoded + (1 - m) * x.to(decoded.device, decoded.dtype)
            images = self.image_processor.postprocess(decoded, output_type=output_type,
                                                      do_denormalize=[False] * len(decoded))
        else:
            images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        return images


class LDMImg2ImgPipeline(_FromImage):
    """Text-guided image-to-image (SDEdit; diffusers' ``StableDiffusionImg2ImgPipeline``): ``image`` (PIL, array
    or tensor in [0, 1]; its size sets the output's) noised to ``strength`` and denoised under the prompt."""

    @torch.no_grad()
    def __call__(self, prompt, image, strength=0.8, negative_prompt=None, num_inference_steps=50,
                 guidance_scale=7.5, num_images_per_prompt=1, generator=None, output_type="pil", return_dict=True,
                 cross_attention_kwargs=None, guidance_rescale=0.0):
        images = self._run(prompt, negative_prompt, image, strength, num_inference_steps, guidance_scale,
                           num_images_per_prompt, generator, output_type, cross_attention_kwargs, guidance_rescale)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class LDMInpaintPipeline(_FromImage):
    """Text-guided inpainting with a text-to-image model (diffusers' ``StableDiffusionInpaintPipeline`` on a
    4-channel U-Net): ``mask_image`` (L-mode PIL, or array/tensor in [0, 1], the image's size; white = draw
    anew) picks the region; the rest follows the image at every step (module docstring)."""

    @torch.no_grad()
    def __call__(self, prompt, image, mask_image, strength=1.0, negative_prompt=None, num_inference_steps=50,
                 guidance_scale=7.5, num_images_per_prompt=1, generator=None, output_type="pil", return_dict=True,
                 cross_attention_kwargs=None, guidance_rescale=0.0, keep_unmasked=True):
        images = self._run(prompt, negative_prompt, image, strength, num_inference_steps, guidance_scale,
                           num_images_per_prompt, generator, output_type, cross_attention_kwargs, guidance_rescale,
                           mask_image=mask_image, keep_unmasked=keep_unmasked)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
