"""The Stable Diffusion XL family's text-to-image stage: fine-tuning an SDXL pipeline folder.

What differs from `TextToImage` (Stable Diffusion 1.x/2.x), all here: the text side is two encoders (the context:
both penultimate hidden states side by side; the pooled projection of the second), cached once while they are
frozen, run every step when they train; every batch carries SDXL's size/crop micro-conditions by name
("time_ids", `SizeConditions`), the objective hands the U-Net ``added_cond_kwargs``, a dropped caption is zeros when the model was trained that way
(``force_zeros_for_empty_prompt``, as the pipeline's unconditional branch), and the pipeline is `LDMXLPipeline`.
`ldm.trainer.stages` picks this stage when ``model.pretrained`` holds an SDXL folder, or for a new model with
``model.family=sdxl`` (two encoders of ``model.text_encoder``'s size over the learned tokenizer, a ``text_time``
U-Net).

Supported here: the full fine-tune (the text encoders too with ``model.train_text_encoder``), LoRA (on both
text encoders too with ``finetune.lora_text_encoder``) and textual inversion (the new word in both tokenizers,
each encoder training its own rows; exported as one clip_l/clip_g file), each with DreamBooth's prior
preservation (class images drawn by `LDMXLPipeline`, class batches with their own time_ids) and the masked loss,
on cached or per-step-cropped latents (those encoded with autocast off: SDXL's VAE overflows in fp16), with
aspect buckets, flips, every objective option of ``diffusion.*``, EMA and exact resume. Refused by name
(`XLTextToImage.check`): super-resolution stages on SDXL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.data.cache import Fingerprint, build_or_open, take
from ldm.data.size_conditions import SizeConditions, StreamedSizeConditions
from ldm.engine.config import Checker
from ldm.methods.registry import METHODS
from ldm.models.text import tokenize
from ldm.models.vae import encode
from ldm.trainer.objective import LatentDiffusionObjective, ObjectiveInputs
from ldm.trainer.stage import TextToImage
from pipelines.sdxl import LDMXLPipeline, encode_token_ids


@dataclass
class XLTextInputs:
    """Every caption's token ids (N, 2, L), the empty caption's (2, L), and the cache of their encodings when
    both encoders are frozen (else None: they run every step)."""

    input_ids: torch.Tensor
    empty_ids: torch.Tensor
    cache: dict | None  # "embeds" (N, L, D), "pooled" (N, P), "empty" (1, L, D), "empty_pooled" (1, P)


class XLTextContext:
    """Caption indices -> (context, {"text_embeds": pooled}): rows of the cache, or both encoders' forward when
    they train. A dropped caption is zeros under ``force_zeros``, else the empty caption's encoding. Validation
    captions are encoded by ``validation_encoders`` (the unwrapped modules)."""

    def __init__(self, inputs: XLTextInputs, encoders: list, force_zeros: bool, validation_encoders=None):
        self.inputs, self.encoders, self.force_zeros = inputs, encoders, force_zeros
        self.validation_encoders = validation_encoders or encoders
        if inputs.cache is not None:
            empty = [torch.from_numpy(inputs.cache[k][0].copy()) for k in ("empty", "empty_pooled")]
            self.empty = [torch.zeros_like(e) for e in empty] if force_zeros else empty

    def encode(self, captions: torch.Tensor, drop: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        cache = self.inputs.cache
        if cache is not None:
            context, pooled = take(cache["embeds"], captions), take(cache["pooled"], captions)
            context[drop], pooled[drop] = self.empty
            return context.to(device), {"text_embeds": pooled.to(device)}
        ids = captions.clone() if captions.dim() == 3 else self.inputs.input_ids[captions]  # streamed: ids (b, 2, L)
        if not self.force_zeros:
            ids[drop] = self.inputs.empty_ids
        context, pooled = encode_token_ids(self.encoders, ids.unbind(1), device)
        if self.force_zeros:
            keep = (~drop).to(device)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        return context, {"text_embeds": pooled}

    @torch.no_grad()
    def validation_context(self, text_encoder, ids: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        context, pooled = encode_token_ids(self.validation_encoders, ids.unbind(1), device)
        return context, {"text_embeds": pooled}


class XLObjective(LatentDiffusionObjective):
    """Latent diffusion with SDXL's added conditions: the pooled text and the batch's "time_ids". Pixels cut each
    step are encoded with autocast off, in the VAE's own precision (fp32 in training) as the latent cache encodes
    them: SDXL's VAE overflows in fp16."""

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.vae.device.type, enabled=False):
            return encode(self.vae, pixels)

    def inputs(self, batch: dict, draws: dict, sl: slice, device) -> ObjectiveInputs:
        inputs = super().inputs(batch, draws, sl, device)
        inputs.conditions["time_ids"] = batch["time_ids"].to(device)
        return inputs

    def validation_inputs(self, mean, std, seed: int, arrays: dict) -> ObjectiveInputs:
        inputs = super().validation_inputs(mean, std, seed, arrays)
        inputs.conditions["time_ids"] = arrays["time_ids"]
        return inputs

    def network(self, unet, inputs: ObjectiveInputs):
        added = {"text_embeds": inputs.conditions["text_embeds"], "time_ids": inputs.conditions["time_ids"]}
        return lambda x, t: unet(x, t, encoder_hidden_states=inputs.context, added_cond_kwargs=added).sample


class XLTextToImage(TextToImage):
    """Text-to-image on a Stable Diffusion XL model (module docstring)."""

    scored = True

    @classmethod
    def check(cls, c: Checker) -> None:
        cfg = c.cfg
        super().check(c)
        c.require(cfg.stage == "base", "stage", "must be base: super-resolution stages of SDXL are not supported")
        c.require("sdxl" in METHODS[cfg.finetune.method].families, "finetune.method",
                  f"must be one of {[n for n, m in METHODS.items() if 'sdxl' in m.families]}: {cfg.finetune.method} "
                  f"does not train Stable Diffusion XL")

    def new_text_side(self, tokenizer) -> dict:
        """A new SDXL model's second tokenizer (the first's vocabulary) and encoder (``model.text_encoder``'s size,
        its pooled output projected); dropped captions are zeros, as SDXL's were."""
        import copy

        from ldm.models.text import build_text_encoder

        tc = self.cfg.model.text_encoder
        encoder = build_text_encoder(tokenizer, tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads,
                                     tc.intermediate_size, with_projection=True)
        return {"tokenizer_2": copy.deepcopy(tokenizer), "text_encoder_2": encoder, "force_zeros": True}

    def unet_inputs(self, latent_channels: int) -> dict:
        """A new U-Net's SDXL inputs: the pooled text projection and six size/crop conditions, each embedded in
        ``model.unet.addition_time_embed_dim`` sinusoids, added to the time embedding."""
        width = self.cfg.model.unet.addition_time_embed_dim
        return {**super().unet_inputs(latent_channels), "addition_embed_type": "text_time",
                "addition_time_embed_dim": width,
                "projection_class_embeddings_input_dim": self.cfg.model.text_encoder.hidden_size + 6 * width}

    def arrays(self, engine, split, flips: bool) -> dict:
        return {"time_ids": SizeConditions(split, self.cfg.data, random_crop=False)}

    def cut_arrays(self, engine, split) -> dict:
        return {"time_ids": SizeConditions(split, self.cfg.data, random_crop=self.cfg.data.random_crop)}

    def validation_arrays(self, engine, split) -> dict:
        return {"time_ids": SizeConditions(split, self.cfg.data, random_crop=False).all()}

    def stream_arrays(self) -> dict:
        return {"time_ids": StreamedSizeConditions(self.cfg.data)}

    def tokenize(self, comp, captions: list[str]) -> torch.Tensor:
        """(N, 2, L): the ids of both tokenizers."""
        return torch.stack([tokenize(comp.tokenizer, captions), tokenize(comp.tokenizer_2, captions)], dim=1)

    def text_inputs(self, cfg, engine, comp, captions: list[str]) -> XLTextInputs:
        """Both encoders' outputs for every caption and the empty one, computed once by the main process."""
        ids, empty = self.tokenize(comp, captions), self.tokenize(comp, [""])
        encoders = [comp.text_encoder.to(engine.device), comp.text_encoder_2.to(engine.device)]
        if comp.train_text_encoder or not cfg.data.cache_text:  # they run every step
            return XLTextInputs(ids, empty[0], None)
        key = "text-xl-" + Fingerprint().tensors(encoders[0].state_dict()).tensors(encoders[1].state_dict()).value(
            list(ids.shape)).raw(ids.numpy().tobytes()).raw(empty.numpy().tobytes()).hexdigest()
        dim = encoders[0].config.hidden_size + encoders[1].config.hidden_size
        pooled = encoders[1].config.projection_dim
        length = ids.shape[-1]
        shapes = {"embeds": (len(ids), length, dim), "pooled": (len(ids), pooled), "empty": (1, length, dim),
                  "empty_pooled": (1, pooled)}

        @torch.no_grad()
        def fill(arrays: dict, rank: int, world: int) -> None:
            if rank != 0:
                return
            for s in range(0, len(ids), 256):
                context, pool = encode_token_ids(encoders, ids[s:s + 256].unbind(1), engine.device)
                arrays["embeds"][s:s + 256], arrays["pooled"][s:s + 256] = context.float().cpu(), pool.float().cpu()
            context, pool = encode_token_ids(encoders, empty.unbind(1), engine.device)
            arrays["empty"][0:1], arrays["empty_pooled"][0:1] = context.float().cpu(), pool.float().cpu()

        cache, _ = build_or_open(cfg.data.cache_dir, key, engine.accelerator, "text-embedding cache", shapes, fill,
                                 lambda folder: {"num_captions": len(ids)})
        return XLTextInputs(ids, empty[0], cache)

    def text_context(self, inputs: XLTextInputs, comp, text_encoders: list) -> XLTextContext:
        return XLTextContext(inputs, text_encoders, comp.force_zeros, [comp.text_encoder, comp.text_encoder_2])

    def objective(self, comp, diffusion, text, gather) -> XLObjective:
        cfg = self.cfg
        return XLObjective(diffusion, cfg.diffusion, cfg.data.caption_dropout, text, comp.vae,
                           cfg.dreambooth.prior_loss_weight, gather=gather, mask_floor=cfg.data.mask_floor)

    def pipeline(self, comp, unet, text_encoder, scheduler):
        return LDMXLPipeline(vae=comp.vae, text_encoder=text_encoder, text_encoder_2=comp.text_encoder_2,
                             tokenizer=comp.tokenizer, tokenizer_2=comp.tokenizer_2, unet=unet, scheduler=scheduler,
                             force_zeros_for_empty_prompt=comp.force_zeros)
