"""Super-resolution stage of a cascade: a text-conditional U-Net that denoises a high-resolution image (or its
latents) given a low-resolution one, in the layout of diffusers' ``StableDiffusionUpscalePipeline``.

The low-resolution image is augmented with Gaussian noise of a chosen level of ``low_res_scheduler`` (a
1000-step DDPM schedule) and the level is passed to the U-Net as ``class_labels`` (conditioning augmentation,
Ho et al. 2022). In latent space the noised image is concatenated to the latents at latent size (the VAE's
factor is the upscaling factor, as in Stable Diffusion's ×4 upscaler); in pixel space (``vae=None``, as
DeepFloyd IF's stages) it is upsampled to the output size first.
"""

import json
import logging
import os

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast

from pipelines.latents import latent_scale_shift, vae_scale_factor
from pipelines.ldm_pipeline import LDMPipeline, _is_int

logger = logging.getLogger(__name__)

# diffusers' StableDiffusionUpscalePipeline decodes with this factor whatever the VAE's config says (it rewrites
# any other value on load); `rescale_latent_space` gives a VAE whose latents fit it.
UPSCALER_SCALING_FACTOR = 0.08333
IMAGE_CHANNELS = 3


NUM_NOISE_LEVELS = 1000  # steps of the low-resolution schedule: the U-Net's class embedding has one per level


def low_res_scheduler() -> DDPMScheduler:
    """The schedule of the augmentation noise: DDPM's linear betas over 1000 steps, as Stable Diffusion's ×4
    upscaler and DeepFloyd IF use; noise level s gives sqrt(ᾱ_s) x + sqrt(1 - ᾱ_s) ε."""
    return DDPMScheduler(num_train_timesteps=NUM_NOISE_LEVELS, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def condition_image(noised: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The (augmented) low-resolution image as the U-Net sees it: at ``size`` (latent size, or the output size
    in pixel space), bilinearly upsampled when smaller."""
    if tuple(noised.shape[-2:]) == tuple(size):
        return noised
    return F.interpolate(noised, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def rescale_latent_space(vae: AutoencoderKL, scaling_factor: float = UPSCALER_SCALING_FACTOR) -> AutoencoderKL:
    """A copy of ``vae`` whose latents are z' = k (z - shift), k = s / ``scaling_factor``, with config scaling
    factor ``scaling_factor`` and no shift: ``scaling_factor`` × its latents equal the original's scaled
    latents s (z - shift), and it decodes them to the same image. An exact reparametrisation of the 1x1
    ``quant_conv`` (mean rows × k, log-variance rows + 2 log k) and ``post_quant_conv`` (weights ÷ k)."""
    import copy

    cfg = vae.config
    if not (cfg.use_quant_conv and cfg.use_post_quant_conv):
        raise ValueError("rescaling a VAE's latent space needs its quant_conv and post_quant_conv "
                         f"(use_quant_conv={cfg.use_quant_conv}, use_post_quant_conv={cfg.use_post_quant_conv})")
    scale, shift = latent_scale_shift(vae)
    k = scale / scaling_factor
    out = copy.deepcopy(vae)
    c = cfg.latent_channels
    q, pq = out.quant_conv, out.post_quant_conv
    q.weight[:c] *= k
    q.bias[:c] = (q.bias[:c] - shift) * k
    q.bias[c:] += 2 * torch.log(torch.tensor(k, dtype=q.bias.dtype))
    pq.bias += pq.weight.sum(dim=(2, 3)) @ torch.full((c,), shift, dtype=pq.weight.dtype)
    pq.weight /= k
    out.register_to_config(scaling_factor=scaling_factor, shift_factor=None)
    return out


class SuperResolutionPipeline(LDMPipeline):
    """Upscale images under a prompt: ``pipe(prompt, image=low_res, noise_level=...)``.

    Same components, call arguments, random draws and folder layout as diffusers'
    ``StableDiffusionUpscalePipeline`` (a folder saved here loads there and draws the same image, and one of
    its folders loads here), plus what `LDMPipeline` adds: learned-variance U-Nets, ``guidance_rescale``,
    per-image generators, pixel-space stages (``vae=None``, which diffusers cannot load), and ``vae_tiling``
    (recorded in the folder; in diffusers call ``pipe.enable_vae_tiling()`` for the same images). ``noise_level``
    above ``max_noise_level`` (the top of the training range) is allowed with a warning. With
    ``num_images_per_prompt > 1`` each image gets its own augmentation noise (diffusers shares one).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    saved_class_name = "StableDiffusionUpscalePipeline"
    _optional_components = ["vae"]

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer | CLIPTokenizerFast,
        unet: UNet2DConditionModel,
        low_res_scheduler: DDPMScheduler,
        scheduler: KarrasDiffusionSchedulers,
        max_noise_level: int = 350,
        upscale_factor: int | None = None,
        vae_tiling: bool = False,
    ):
        super(LDMPipeline, self).__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              low_res_scheduler=low_res_scheduler, scheduler=scheduler)
        if vae is None and not (_is_int(upscale_factor) and upscale_factor >= 1):
            raise ValueError(f"a pixel-space stage (vae=None) needs upscale_factor, a positive int; got "
                             f"{upscale_factor!r}")
        self.register_to_config(max_noise_level=max_noise_level,
                                upscale_factor=None if vae is not None else upscale_factor,
                                vae_tiling=bool(vae_tiling and vae is not None))
        if self.config.vae_tiling:  # a stage trained on latents encoded in tiles decodes in tiles too
            vae.enable_tiling()
        self.vae_scale_factor = vae_scale_factor(self.vae)
        self.upscale_factor = self.vae_scale_factor if vae is not None else upscale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")

    def save_pretrained(self, save_directory, **kwargs):
        if self.vae is not None and self.vae.config.scaling_factor != UPSCALER_SCALING_FACTOR:
            logger.warning("the VAE's scaling_factor is %s; diffusers' StableDiffusionUpscalePipeline will decode "
                           "this folder with %s (save a VAE from rescale_latent_space to load it there)",
                           self.vae.config.scaling_factor, UPSCALER_SCALING_FACTOR)
        super().save_pretrained(save_directory, **kwargs)
        if self.vae is not None:  # diffusers' upscaler takes no upscale_factor: keep its layout exactly
            path = os.path.join(save_directory, "model_index.json")
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
            index.pop("upscale_factor", None)
            if not index.get("vae_tiling"):
                index.pop("vae_tiling", None)
            index.pop("requires_safety_checker", None)
            index["watermarker"] = [None, None]
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(path + ".tmp", path)

    def _latent_channels(self) -> int:
        return self.unet.config.in_channels - IMAGE_CHANNELS

    def _unet_extra(self, model_in):
        cond, labels = self._cond
        return torch.cat([model_in, cond.to(model_in.dtype)], dim=1), {"class_labels": labels}

    def _low_res(self, image, batch: int) -> torch.Tensor:
        """The low-resolution images (batch, 3, h, w) in [-1, 1]: one per prompt, or one for all prompts."""
        if image is None:
            raise ValueError("image (the low-resolution input) is required")
        try:
            pixels = self.image_processor.preprocess(image)
        except (ValueError, TypeError) as e:
            raise ValueError(f"image must be a PIL image, a numpy array, a tensor (B, 3, h, w) or a list of them; "
                             f"{e}") from None
        if pixels.shape[1] != IMAGE_CHANNELS:
            raise ValueError(f"image must have {IMAGE_CHANNELS} channels (RGB), got {pixels.shape[1]}")
        if len(pixels) == 1 and batch > 1:
            pixels = pixels.expand(batch, -1, -1, -1)
        if len(pixels) != batch:
            raise ValueError(f"got {len(pixels)} image(s) for {batch} prompt(s): give one image per prompt, or one")
        return pixels

    def _check_noise_level(self, noise_level) -> None:
        top = self.low_res_scheduler.config.num_train_timesteps - 1
        if not (_is_int(noise_level) and 0 <= noise_level <= top):
            raise ValueError(f"noise_level must be an int in [0, {top}] (a step of low_res_scheduler), "
                             f"got {noise_level!r}")
        if noise_level > self.config.max_noise_level:
            logger.warning("noise_level=%d is above this stage's max_noise_level=%d (the top of its training range)",
                           noise_level, self.config.max_noise_level)

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        image=None,
        num_inference_steps=75,
        guidance_scale=9.0,
        noise_level=20,
        negative_prompt=None,
        num_images_per_prompt=1,
        generator=None,
        output_type="pil",
        return_dict=True,
        cross_attention_kwargs=None,
        guidance_rescale=0.0,
    ):
        prompt_list = [prompt] if isinstance(prompt, str) else prompt
        low = self._low_res(image, len(prompt_list) if isinstance(prompt_list, list) else 1)
        f = self.upscale_factor
        height, width = low.shape[2] * f, low.shape[3] * f
        s = self._sampling(prompt, negative_prompt, height, width, num_images_per_prompt=num_images_per_prompt,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, generator=generator, output_type=output_type,
                           cross_attention_kwargs=cross_attention_kwargs)
        self._check_noise_level(noise_level)
        scheduler, pass_variance = self._sampling_scheduler()
        device, dtype = self._execution_device, self.unet.dtype
        context = self._context(s, device)

        # Random draws in the order of StableDiffusionUpscalePipeline: the augmentation noise, then the latents.
        low = low.to(device=device, dtype=context.context.dtype).repeat_interleave(num_images_per_prompt, dim=0)
        levels = torch.full((len(low),), noise_level, dtype=torch.long, device=device)
        noise = randn_tensor(low.shape, generator=generator, device=device, dtype=low.dtype)
        low = self.low_res_scheduler.add_noise(low, noise, levels)
        g = self.vae_scale_factor
        cond = condition_image(low, (height // g, width // g))
        if s.guided:
            cond, levels = torch.cat([cond] * 2), torch.cat([levels] * 2)
        shape = (len(low), self._latent_channels(), height // g, width // g)
        scheduler.set_timesteps(s.num_inference_steps, device=device)  # the initial noise scale may follow it
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
        self._cond = (cond, levels)
        try:
            latents = self._denoise(latents, scheduler, pass_variance, context, s)
        finally:
            del self._cond
        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
