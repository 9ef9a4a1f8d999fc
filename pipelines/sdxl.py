"""Stable Diffusion XL's text-to-image pipeline: `LDMPipeline` with SDXL's two text encoders and added conditions.

What SDXL adds to Stable Diffusion 1.x/2.x, done as diffusers' ``StableDiffusionXLPipeline`` does it (which draws
the same images from the same folder: tested):

- two text encoders, CLIP ViT-L (``text_encoder``, a ``CLIPTextModel``) and OpenCLIP bigG
  (``text_encoder_2``, a ``CLIPTextModelWithProjection``), each with its tokenizer; the context is the
  penultimate hidden states of both, concatenated on the feature axis (768 + 1280 = 2048 in SDXL);
- added conditions: the second encoder's pooled, projected output (``text_embeds``) and the micro-conditions
  ``time_ids`` = (original height, original width, crop top, crop left, target height, target width), passed
  to the U-Net as ``added_cond_kwargs``;
- the unconditional branch of guidance: zeros instead of the empty prompt's encoding when the folder says
  ``force_zeros_for_empty_prompt`` and no negative prompt is given;
- a VAE that overflows in fp16 (``force_upcast``): decoded in fp32 when the pipeline runs in fp16.

Saved folders name ``StableDiffusionXLPipeline`` in model_index.json, so diffusers loads them as SDXL.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import scale_lora_layers, unscale_lora_layers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.img2img import LDMImg2ImgPipeline, LDMInpaintPipeline
from pipelines.ldm_pipeline import Conditioning, LDMPipeline, Sampling, warn_truncated


def time_ids(original_size, crops_coords_top_left, target_size) -> list[int]:
    """SDXL's micro-conditions of one image: (original h, original w, crop top, crop left, target h, target w)."""
    values = [*original_size, *crops_coords_top_left, *target_size]
    if len(values) != 6 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"original_size, crops_coords_top_left and target_size must be pairs of ints >= 0, got "
                         f"{original_size!r}, {crops_coords_top_left!r}, {target_size!r}")
    return values


def encode_token_ids(encoders, ids, device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning of token ids, one (b, L) tensor per text encoder in order: (context (b, L, D1 + D2):
    every encoder's penultimate hidden states side by side, pooled (b, P): the last encoder's projected output,
    bigG's ``text_embeds``). The pipeline and the trainer both encode through it (the trainer's encoders may be
    wrapped for DDP, so the pooled output is found by what the last one returns, not by its class)."""
    if len(ids) != len(encoders):
        raise ValueError(f"got {len(ids)} token-id tensors for {len(encoders)} text encoders: give one per encoder")
    states = []
    for encoder, tokens in zip(encoders, ids):
        out = encoder(tokens.to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])  # (b, L, D_k)
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        raise ValueError(f"the last text encoder ({type(out).__name__} output) has no text_embeds: SDXL's pooled "
                         f"text comes from a CLIPTextModelWithProjection")
    return torch.cat(states, dim=-1), pooled


def is_sdxl_unet(unet_config) -> bool:
    """Whether a U-Net takes SDXL's added conditions (pooled text and size/crop ids)."""
    return getattr(unet_config, "addition_embed_type", None) == "text_time"


class LDMXLPipeline(StableDiffusionXLLoraLoaderMixin, LDMPipeline):
    """Text-to-image with a Stable Diffusion XL model (module docstring); otherwise as `LDMPipeline`.

    ``original_size``, ``crops_coords_top_left`` and ``target_size`` are SDXL's micro-conditions (default: the
    drawn size, no crop); ``negative_*`` the same for the unconditional branch (default: the same values).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    family = "sdxl"
    saved_class_name = "StableDiffusionXLPipeline"
    _optional_components = ["vae", "tokenizer", "text_encoder"]

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_modules(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        if not is_sdxl_unet(unet.config):
            raise ValueError(f"an SDXL pipeline needs a U-Net with addition_embed_type='text_time', got "
                             f"{unet.config.addition_embed_type!r}")

    def _index_entries(self) -> dict:
        """StableDiffusionXLPipeline's optional components as nulls."""
        return {"image_encoder": [None, None], "feature_extractor": [None, None]}

    def load_lora_weights(self, *args, **kwargs):
        if self._fused_qkv:  # the adapters attach to the separate projections
            self.unet.unfuse_qkv_projections()
            self._fused_qkv = False
        return StableDiffusionXLLoraLoaderMixin.load_lora_weights(self, *args, **kwargs)

    def _encoders(self) -> list[tuple]:
        return [(t, e) for t, e in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
                if e is not None]

    def _encode(self, texts, n, device, lora_scale=None):
        """(context (B·n, L, D1 + D2): both encoders' penultimate hidden states, pooled (B·n, P): the second
        encoder's projected output), each prompt's copies adjacent."""
        encoders = self._encoders()
        if lora_scale is not None:
            for _, encoder in encoders:
                scale_lora_layers(encoder, lora_scale)
        try:
            ids = []
            for tokenizer, _ in encoders:
                converted = self.maybe_convert_prompt(texts, tokenizer)  # multi-vector textual-inversion tokens
                if tokenizer is encoders[0][0]:
                    warn_truncated(tokenizer, converted)
                ids.append(tokenizer(converted, padding="max_length", max_length=tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids)
            context, pooled = encode_token_ids([e for _, e in encoders], ids, device)
        finally:
            if lora_scale is not None:
                for _, encoder in encoders:
                    unscale_lora_layers(encoder, lora_scale)
        return context.repeat_interleave(n, dim=0), pooled.repeat_interleave(n, dim=0)

    def _context(self, s: Sampling, device) -> Conditioning:
        lora_scale = (s.cross_attention_kwargs or {}).get("scale")
        context, pooled = self._encode(s.prompts, s.num_images_per_prompt, device, lora_scale)
        drawn = time_ids((s.height, s.width), (0, 0), (s.height, s.width))  # the default: no crop, drawn size
        sizes = {"time_ids": drawn, "negative_time_ids": drawn, **s.conditions}
        ids = torch.tensor([sizes["time_ids"]] * s.batch, device=device)
        if s.guided:
            if self.config.force_zeros_for_empty_prompt and not s.negatives_given:
                negative, negative_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
            else:
                negative, negative_pooled = self._encode(s.negatives, s.num_images_per_prompt, device, lora_scale)
            negative_ids = torch.tensor([sizes["negative_time_ids"]] * s.batch, device=device)
            context, pooled = torch.cat([negative, context]), torch.cat([negative_pooled, pooled])
            ids = torch.cat([negative_ids, ids])
        dtype = self.unet.dtype
        added = {"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}
        return Conditioning(context.to(dtype), {"added_cond_kwargs": added})

    def _decode(self, latents, output_type):
        vae = self.vae
        if output_type == "latent" or not (vae.dtype == torch.float16 and vae.config.force_upcast):
            return super()._decode(latents, output_type)
        vae.to(torch.float32)  # SDXL's VAE overflows in fp16
        try:
            return super()._decode(latents.float(), output_type)
        finally:
            vae.to(torch.float16)

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        negative_prompt=None,
        num_inference_steps=50,
        guidance_scale=5.0,
        height=None,
        width=None,
        num_images_per_prompt=1,
        generator=None,
        output_type="pil",
        return_dict=True,
        cross_attention_kwargs=None,
        guidance_rescale=0.0,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        negative_original_size=None,
        negative_crops_coords_top_left=None,
        negative_target_size=None,
    ):
        height, width = self._size(height, width)
        sizes = (tuple(original_size or (height, width)), tuple(crops_coords_top_left), tuple(target_size or (height, width)))
        negatives = sizes  # diffusers: the prompt's ids unless both negative sizes are given
        if negative_original_size is not None and negative_target_size is not None:
            negatives = (tuple(negative_original_size), tuple(negative_crops_coords_top_left or (0, 0)),
                         tuple(negative_target_size))
        s = self._sampling(prompt, negative_prompt, height, width, num_images_per_prompt=num_images_per_prompt,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, generator=generator, output_type=output_type,
                           cross_attention_kwargs=cross_attention_kwargs, conditions={"time_ids": time_ids(*sizes),
                                                                                     "negative_time_ids": time_ids(*negatives)})
        return self._generate(s, return_dict)


class LDMXLImg2ImgPipeline(LDMImg2ImgPipeline, LDMXLPipeline):
    """Image-to-image with a Stable Diffusion XL model, as `LDMImg2ImgPipeline` (diffusers'
    ``StableDiffusionXLImg2ImgPipeline`` on a base model draws the same images); the size conditions are the
    image's size, uncropped. ``LDMImg2ImgPipeline.from_pipe`` / ``from_pretrained`` pick it for SDXL models."""


class LDMXLInpaintPipeline(LDMInpaintPipeline, LDMXLPipeline):
    """Inpainting with a Stable Diffusion XL text-to-image model, as `LDMInpaintPipeline` (diffusers'
    ``StableDiffusionXLInpaintPipeline`` on a 4-channel U-Net draws the same images); the size conditions are the
    image's size, uncropped. ``LDMInpaintPipeline.from_pipe`` / ``from_pretrained`` pick it for SDXL models."""
