"""The stage a run trains, the trainer's extension point for model families: what its U-Net takes, which
per-image arrays its batches carry, its objective, the pipeline that samples it and the folder it exports.

`TextToImage` is Stable Diffusion's stage (1.x/2.x, and DDPM on pixels with ``model.vae: none``): latents and a
text context. A stage that needs more (a super-resolution stage's low-resolution image, `ldm.trainer.superres`)
subclasses it and overrides what differs; `ldm.trainer.stages.STAGES` names them for ``stage:`` in the config.
The trainer asks the run's stage and never tests which one it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.data.batches import CachedArrays
from ldm.data.cache import CachePlace, text_cache
from ldm.engine.config import Checker
from ldm.models.text import tokenize
from ldm.models.vae import is_pixel_space
from ldm.trainer.objective import LatentDiffusionObjective, TextContext
from ldm.trainer.validation import ValidationSet, sample_grid
from pipelines.latents import vae_scale_factor


def cache_place(cfg, engine) -> CachePlace:
    """Where the run's caches live (``data.cache_dir``) and who builds them."""
    return CachePlace(cfg.data.cache_dir, engine.accelerator, cfg.train.num_workers)


@dataclass
class TextInputs:
    """Token ids (N, L) of every caption and (L,) of the empty one, and the cache of their embeddings when the
    text encoder is frozen (else None: the encoder runs every step)."""

    input_ids: torch.Tensor
    empty_ids: torch.Tensor
    cache: dict | None


class TextToImage:
    """Text-to-image: the U-Net denoises latents (or pixels) under the captions' context."""

    scored = True  # on built-in data, validation reads its samples with the built-in scorer
    streams = True  # trains from streamed webdataset shards (`ldm.data.stream`), with `stream_arrays`

    def __init__(self, cfg):
        self.cfg = cfg  # checked (`check`) before the stage is made

    @classmethod
    def check(cls, c: Checker) -> None:
        """The stage's own settings, and what it does not combine with."""
        c.require(not c.cfg.model.vae_tiling, "model.vae_tiling",
                  "is for latent super-resolution stages (stage=super_resolution with a VAE)")

    def unet_inputs(self, latent_channels: int) -> dict:
        """What a new U-Net takes besides the config's sizes: ``in_channels``, ``num_class_embeds``."""
        return {"in_channels": latent_channels, "num_class_embeds": None}

    def new_text_side(self, tokenizer) -> dict:
        """A new model's text side beyond ``tokenizer`` and its encoder (`ldm.models.components.Components`
        fields); none here."""
        return {}

    def check_unet(self, unet, vae, where: str) -> None:
        """Refuse a U-Net (new or pretrained, named by ``where``) the stage cannot train."""

    def size_multiple(self, vae) -> int:
        """What every training image's side must be a multiple of: one latent pixel."""
        return vae_scale_factor(vae)

    def arrays(self, engine, split, flips: bool) -> dict[str, CachedArrays]:
        """The per-image arrays, by name, that batches of ``split`` carry beside its cached latents (cached the
        same way, both orientations when ``flips``); none here."""
        return {}

    def cut_arrays(self, engine, split) -> dict:
        """The per-image arrays, by name, cut each step beside the pixels when images cannot be cached (e.g. a new
        random crop every step); none here."""
        return {}

    def validation_arrays(self, engine, split) -> dict:
        """The same arrays (V, ...) of the validation images, for the objective's validation inputs."""
        return {}

    def stream_arrays(self) -> dict:
        """The per-image arrays, by name, of streamed samples: each with ``load_rows(rows, size, flips, crop_seeds)``
        for a step's [(image or precomputed latent, caption)] cut to ``size``; none here."""
        return {}

    def tokenize(self, comp, captions: list[str]) -> torch.Tensor:
        """Token ids of ``captions``: (N, L)."""
        return tokenize(comp.tokenizer, captions)

    def text_inputs(self, cfg, engine, comp, captions: list[str]) -> TextInputs:
        """Every caption's ids, and their embeddings' cache when the text encoder is frozen."""
        input_ids, empty_ids = self.tokenize(comp, captions), self.tokenize(comp, [""])[0]
        cached = cfg.data.cache_text and not comp.train_text_encoder
        cache = text_cache(comp.text_encoder, input_ids, empty_ids, cfg.data.cache_dir, engine.accelerator) \
            if cached else None
        return TextInputs(input_ids, empty_ids, cache)

    def text_context(self, inputs: TextInputs, comp, text_encoders: list) -> TextContext:
        """Caption indices -> the U-Net's context, from the cache or by the (prepared) text encoder."""
        return TextContext(inputs.input_ids, inputs.empty_ids,
                           encoder=text_encoders[0] if inputs.cache is None else None, cache=inputs.cache)

    def objective(self, comp, diffusion, text: TextContext, gather) -> LatentDiffusionObjective:
        cfg = self.cfg
        return LatentDiffusionObjective(diffusion, cfg.diffusion, cfg.data.caption_dropout, text, comp.vae,
                                        cfg.dreambooth.prior_loss_weight, gather=gather, mask_floor=cfg.data.mask_floor)

    def pipeline(self, comp, unet, text_encoder, scheduler):
        """The pipeline that samples the stage, over the run's VAE and tokenizer."""
        from pipelines import LDMPipeline

        return LDMPipeline(vae=None if is_pixel_space(comp.vae) else comp.vae, text_encoder=text_encoder,
                           tokenizer=comp.tokenizer, unet=unet, scheduler=scheduler)

    def for_export(self, pipe):
        """The pipeline as it is saved (a stage may reparametrise it for other tools' loaders)."""
        return pipe

    def sample_grid(self, pipe, prompts: list[str], data: ValidationSet, sample) -> object:
        """The validation grid: one row per prompt, one column per seed of ``sample`` (the config's section)."""
        return sample_grid(pipe, prompts, sample.seeds, sample.num_inference_steps, sample.guidance_scale)
