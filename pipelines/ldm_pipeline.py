"""Text-to-image latent diffusion pipeline (VAE + CLIP text encoder + conditional U-Net)."""

import inspect
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMParallelScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast

from pipelines.latents import latent_scale_shift, unscale_latents, vae_scale_factor

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def truncated_parts(tokenizer, texts: list[str]) -> list[str]:
    """What the text encoder does not see of each text: its words past the tokenizer's length ("" for a text
    that fits; the start and end tokens take two places)."""
    limit = tokenizer.model_max_length - 2
    ids = tokenizer(list(texts), truncation=False, add_special_tokens=False).input_ids
    return [tokenizer.decode(i[limit:]) if len(i) > limit else "" for i in ids]


def warn_truncated(tokenizer, texts: list[str]) -> list[str]:
    """Warn, with the words dropped, for each text longer than the tokenizer's length; return the dropped parts."""
    dropped = truncated_parts(tokenizer, texts)
    for cut in filter(None, dropped):
        logger.warning("prompt longer than the text encoder's %d tokens; it does not see: %r",
                       tokenizer.model_max_length, cut)
    return dropped


LEARNED_VARIANCE = ("learned", "learned_range")
# Schedulers whose `step` splits a [mean, variance] model output by itself (by comparing channel counts).
# Others with a learned `variance_type` (DPM-Solver family, SA-Solver) slice `model_output[:, :3]`, which is
# only right for 3-channel pixel models, so the pipeline drops the variance for them instead.
VARIANCE_SPLITTING_SCHEDULERS = (DDPMScheduler, DDPMParallelScheduler)
# Saved folders claim to be Stable Diffusion: diffusers' generic loader resolves `_class_name` on the diffusers
# module, where "LDMPipeline" is an unrelated (deprecated, unconditional) pipeline.
SAVED_CLASS_NAME = "StableDiffusionPipeline"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class Sampling:
    """The settings of one call, checked by `LDMPipeline._sampling`."""

    prompts: list[str]  # (B,)
    negatives: list[str]  # (B,): "" where none was given
    height: int
    width: int
    num_images_per_prompt: int = 1
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    generator: object = None  # a torch.Generator, one per image, or None
    output_type: str = "pil"
    cross_attention_kwargs: dict | None = None  # {"scale": s}: LoRA adapters at scale s
    negatives_given: bool = False  # whether the caller gave negative prompts (else "" stands in)
    conditions: dict = field(default_factory=dict)  # a model family's own settings by name (SDXL's sizes)

    @property
    def batch(self) -> int:
        """Images drawn: each prompt's copies adjacent."""
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def guided(self) -> bool:
        """Classifier-free guidance: one U-Net pass over the negatives' and the prompts' contexts."""
        return self.guidance_scale > 1.0


@dataclass
class Conditioning:
    """What the U-Net is conditioned on in every step of one call, the negatives' rows first under guidance."""

    context: torch.Tensor  # (B', L, D): the text context it cross-attends to
    unet_kwargs: dict = field(default_factory=dict)  # more U-Net inputs by keyword (SDXL's added_cond_kwargs)


class LDMPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    """Text-to-image latent diffusion pipeline.

    A CLIP text encoder turns the prompt into a context sequence, a conditional U-Net denoises random latents
    under that context (with classifier-free guidance), and the VAE decoder maps the final latents to images.
    Any diffusers scheduler can be swapped in, U-Nets that predict a learned variance (``out_channels ==
    2 * in_channels``) are supported, and folders written by ``save_pretrained`` load with diffusers'
    ``StableDiffusionPipeline`` as well as with this class (which also loads Stable Diffusion 1.x folders).
    LoRA adapters in diffusers' layout load with ``load_lora_weights``; ``cross_attention_kwargs={"scale": s}``
    runs them at scale s, as in ``StableDiffusionPipeline``. Textual-inversion embeddings (diffusers' or
    AUTOMATIC1111's layout) load with ``load_textual_inversion``; prompts naming a multi-vector token are
    expanded to all its vectors.

    With ``vae=None`` it is a pixel-space model (DDPM, trained with ``model.vae: none``): the U-Net denoises
    the image itself, and its saved folder holds no VAE (so it loads here, not in ``StableDiffusionPipeline``).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    family = "sd"  # the model family it draws (`pipelines.families`)
    task = "text2image"  # what it draws (`pipelines.families.PIPELINES`)
    saved_class_name = SAVED_CLASS_NAME
    max_images_per_call = 512  # a bound on prompts x num_images_per_prompt: one batch holds them all
    _fused_qkv = False  # enable_fast's switches in force
    _cuda_graphs = False
    _optional_components = ["vae"]

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer | CLIPTokenizerFast,  # one class in transformers 5, two in 4.x
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = vae_scale_factor(self.vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def save_pretrained(self, save_directory, **kwargs):
        """Save as a diffusers folder (safetensors) whose model_index.json names ``StableDiffusionPipeline``."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub=True is not supported: save locally, then upload the folder")
        if not kwargs.setdefault("safe_serialization", True):
            raise ValueError("LDMPipeline saves safetensors only, got safe_serialization=False")
        super().save_pretrained(save_directory, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index.update(_class_name=self.saved_class_name, **self._index_entries())
        # Write-then-rename so an interrupted save never leaves a truncated model_index.json behind.
        fd, tmp_path = tempfile.mkstemp(dir=save_directory, prefix=".model_index.", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp_path, index_path)
        except BaseException:
            os.unlink(tmp_path)
            raise

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a pipeline folder. A Stable Diffusion XL folder loads as `LDMXLPipeline` (the family is read from
        the folder); a class that cannot draw the folder's family says so instead of dropping its components. The
        path must be a folder here (``hf://<org>/<model>`` asks the Hub), its weights safetensors, and a folder
        whose weight files lack a tensor of a model (or hold one it has not) is refused naming them
        (`pipelines.local`)."""
        from pipelines.families import family_of
        from pipelines.local import check_folder, check_weights, resolve

        name, local = resolve(pretrained_model_name_or_path)
        if local:
            check_folder(name)
        family = family_of(name) if local else None
        if family is not None and family != cls.family:
            return cls._family_class(family, f"{name} holds").from_pretrained(pretrained_model_name_or_path, **kwargs)
        if local:
            kwargs = {"local_files_only": True, "use_safetensors": True, **kwargs}
        try:
            pipe = super().from_pretrained(name, **kwargs)
        except OSError as e:
            if local:
                raise
            raise FileNotFoundError(f"{pretrained_model_name_or_path}: not in this machine's Hugging Face cache, and the "
                                    f"Hub could not give it ({str(e).split('(')[0].strip()})") from None
        if local:
            check_weights(pipe, name)
        return pipe

    @classmethod
    def _family_class(cls, family: str, what: str):
        """The class of ``family`` for this class's task, when this class is the task's Stable Diffusion one (the
        entry point that picks), else a clear error."""
        from pipelines.families import pipeline_class

        target = pipeline_class(family, cls.task)
        if cls is not pipeline_class("sd", cls.task):
            raise ValueError(f"{what} a {family} model and {cls.__name__} draws {cls.family} models: use "
                             f"{target.__name__} (or {pipeline_class('sd', cls.task).__name__}, which picks it)")
        return target

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """This class over another pipeline's components, when it draws that pipeline's model family."""
        family = getattr(pipeline, "family", cls.family)
        if family != cls.family:
            return cls._family_class(family, f"the {type(pipeline).__name__} holds").from_pipe(pipeline, **kwargs)
        return super().from_pipe(pipeline, **kwargs)

    def _index_entries(self) -> dict:
        """What model_index.json needs beside our components for the saved class to load it: SD's optional
        components as nulls, so StableDiffusionPipeline.from_pretrained loads without a safety checker."""
        return {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}

    @classmethod
    def from_single_file(cls, path, config=None, **kwargs):
        """A pipeline from one ``.safetensors`` file in Stable Diffusion's original layout (AUTOMATIC1111's, or
        `pipelines.to_single_file`'s), read by diffusers' own converter; a Stable Diffusion XL file (SDXL's
        layout) loads as `LDMXLPipeline`, as `from_pretrained` picks the family. ``config``: a diffusers folder
        with the architecture's configs (the ``<stem>.config`` folder written beside the file, or a Stable
        Diffusion 1.x / XL folder for a file made elsewhere); None reads the configs kept in the file's metadata,
        else that folder. ``kwargs`` go to diffusers' ``from_single_file`` (e.g. ``torch_dtype``)."""
        from pipelines.original_layout import load_components

        components = load_components(path, config, **kwargs)
        family = "sdxl" if "text_encoder_2" in components else "sd"
        target = cls if family == cls.family else cls._family_class(family, f"{path} holds")
        return target(**components)

    # ---- speed ----------------------------------------------------------------------------------------

    def enable_fast(self, compile: str | None = "regional", mode: str | None = None,
                    channels_last: bool | None = None, fuse_qkv: bool = True, backend: str = "inductor"):
        """Sample faster; outputs equal the eager pipeline's up to float rounding. Undo with `disable_fast`.

        - ``compile``: ``"regional"`` compiles each repeated block of the U-Net and the VAE decoder (resnets,
          transformer blocks, resampling) once per shape and reuses it across instances, for a short warm-up;
          ``"full"`` compiles the whole U-Net as one graph (``fullgraph=True``) and the VAE decoder, the
          fastest warm step for the longest warm-up; None compiles nothing. The first call at a new size or
          batch pays the compile.
        - ``mode``: ``torch.compile``'s mode; None picks ``"reduce-overhead"`` (CUDA graphs over the U-Net) for
          ``"full"`` on CUDA, the default mode otherwise.
        - ``channels_last``: NHWC convolutions; None turns it on for CUDA only (slower on CPU).
        - ``fuse_qkv``: one projection for the query, key and value of self-attention (and key, value of
          cross-attention), as diffusers' ``fuse_qkv_projections``; skipped while LoRA adapters are loaded.
          Loading LoRA weights later unfuses them first.
        - ``backend``: ``torch.compile``'s backend.
        Classifier-free guidance already runs both halves in one U-Net pass and the text is encoded once per call.
        """
        from pipelines.fast import compile_model, set_channels_last

        self.disable_fast()
        cuda = self.unet.device.type == "cuda"
        set_channels_last(self.unet, cuda if channels_last is None else channels_last)
        if fuse_qkv:
            if getattr(self.unet, "peft_config", None):
                logger.info("enable_fast: LoRA adapters are loaded, so the attention projections stay unfused")
            else:
                self.unet.fuse_qkv_projections()
                self._fused_qkv = True
        if compile is not None:
            kwargs = {"mode": mode or ("reduce-overhead" if compile == "full" and cuda else None), "backend": backend}
            if compile == "full":
                kwargs["fullgraph"] = True
            compile_model(self.unet, compile, **kwargs)
            self._cuda_graphs = kwargs["mode"] == "reduce-overhead"
            if self.vae is not None:
                compile_model(self.vae.decoder, "regional", mode=mode if compile == "regional" else None,
                              backend=backend)
        return self

    def disable_fast(self):
        """Back to eager sampling in the default layout, with unfused projections."""
        from pipelines.fast import set_channels_last, uncompile

        for model in (self.unet, getattr(self.vae, "decoder", None)):
            if model is not None:
                uncompile(model)
        set_channels_last(self.unet, False)
        self._cuda_graphs = False
        if self._fused_qkv:
            self.unet.unfuse_qkv_projections()
            self._fused_qkv = False
        return self

    def load_lora_weights(self, *args, **kwargs):
        if self._fused_qkv:  # the adapters attach to the separate projections
            logger.info("load_lora_weights: unfusing the attention projections that enable_fast fused")
            self.unet.unfuse_qkv_projections()
            self._fused_qkv = False
        return super().load_lora_weights(*args, **kwargs)

    # Decoding large images with modest memory: tiles (overlapping, blended) or one image at a time.
    def enable_vae_tiling(self):
        if self.vae is not None:  # a pixel-space pipeline decodes nothing
            self.vae.enable_tiling()

    def disable_vae_tiling(self):
        if self.vae is not None:  # a pixel-space pipeline decodes nothing
            self.vae.disable_tiling()

    def enable_vae_slicing(self):
        if self.vae is not None:  # a pixel-space pipeline decodes nothing
            self.vae.enable_slicing()

    def disable_vae_slicing(self):
        if self.vae is not None:  # a pixel-space pipeline decodes nothing
            self.vae.disable_slicing()

    def _sampling(self, prompt, negative_prompt, height, width, **settings) -> Sampling:
        """The call's `Sampling`, every value checked (``settings``: its other fields by name)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif not (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        given = negative_prompt is not None
        if negative_prompt is None or isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt or ""] * len(prompt)
        elif not (isinstance(negative_prompt, list) and all(isinstance(p, str) for p in negative_prompt)):
            raise ValueError(f"negative_prompt must be None, a str or a list of str, got {negative_prompt!r}")
        elif len(negative_prompt) != len(prompt):
            raise ValueError(
                f"negative_prompt must have one entry per prompt ({len(prompt)}), got {len(negative_prompt)}"
            )
        s = Sampling(prompt, negative_prompt, height, width, **settings)
        s.negatives_given = given
        self._check_size(s)
        self._check_numbers(s)
        self._check_output(s)
        return s

    def _check_size(self, s: Sampling) -> None:
        f = self.vae_scale_factor
        for name, value in (("height", s.height), ("width", s.width)):
            if not (_is_int(value) and value > 0 and value % f == 0):
                raise ValueError(f"{name} must be a positive multiple of {f}, got {value!r}")

    def _check_numbers(self, s: Sampling) -> None:
        max_steps, steps = self.scheduler.config.num_train_timesteps, s.num_inference_steps
        if not (_is_int(steps) and 0 < steps <= max_steps):
            raise ValueError(f"num_inference_steps must be an int in [1, {max_steps}], got {steps!r}")
        if not (_is_number(s.guidance_scale) and s.guidance_scale >= 1 and math.isfinite(s.guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number >= 1.0 (1.0 disables guidance), "
                             f"got {s.guidance_scale!r}")
        if not (_is_number(s.guidance_rescale) and 0.0 <= s.guidance_rescale <= 1.0):
            raise ValueError(f"guidance_rescale must be a number in [0, 1] (0 turns it off), got {s.guidance_rescale!r}")
        n = s.num_images_per_prompt
        if not (_is_int(n) and n > 0):
            raise ValueError(f"num_images_per_prompt must be a positive int, got {n!r}")
        if s.batch > self.max_images_per_call:
            raise ValueError(f"{len(s.prompts)} prompt(s) x num_images_per_prompt={n} = {s.batch} images in one "
                             f"call; at most {self.max_images_per_call} (set pipe.max_images_per_call to allow more, "
                             f"or call several times)")
        size, f = self.unet.config.sample_size, self.vae_scale_factor
        trained = [f * (size if _is_int(size) else size[i]) for i in range(2)]
        for name, value, native in (("height", s.height, trained[0]), ("width", s.width, trained[1])):
            if not 0.5 <= value / native <= 2:
                logger.warning("%s=%d is far from the %d the U-Net was built for; expect poor images", name, value,
                               native)

    def _check_output(self, s: Sampling) -> None:
        if s.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {s.output_type!r}")
        generator = s.generator
        if isinstance(generator, list):
            if len(generator) != s.batch or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(
                    f"a generator list must hold one torch.Generator per image ({s.batch} = prompts x "
                    f"num_images_per_prompt), got {len(generator)} item(s)"
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be None, a torch.Generator or a list of them, got {generator!r}")

    def _sampling_scheduler(self):
        """Return the scheduler to sample with and whether it takes a [mean, variance] model output."""
        scheduler, unet_cfg, ch = self.scheduler, self.unet.config, self._latent_channels()
        learned_unet = unet_cfg.out_channels == 2 * ch
        if not learned_unet and unet_cfg.out_channels != ch:
            raise ValueError(
                f"unet out_channels must equal the latent channels ({ch}) or twice them for a learned "
                f"variance, got {unet_cfg.out_channels}"
            )
        learned_sched = getattr(scheduler.config, "variance_type", None) in LEARNED_VARIANCE
        if not learned_sched:
            return scheduler, False
        if isinstance(scheduler, VARIANCE_SPLITTING_SCHEDULERS):
            if not learned_unet:
                raise ValueError(
                    f"scheduler variance_type={scheduler.config.variance_type!r} needs a unet that predicts the "
                    f"variance (out_channels={2 * ch}), got out_channels={unet_cfg.out_channels}"
                )
            return scheduler, True
        # The pipeline already drops the variance; a per-call copy stops the scheduler slicing channels again.
        return scheduler.__class__.from_config(scheduler.config, variance_type=None), False

    def _encode(self, texts, n, device, lora_scale=None):
        texts = self.maybe_convert_prompt(texts, self.tokenizer)  # multi-vector textual-inversion tokens
        warn_truncated(self.tokenizer, texts)
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        if lora_scale is not None:  # text-encoder adapters at the asked scale, as StableDiffusionPipeline does
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            # Each prompt's copies stay adjacent, matching the order of StableDiffusionPipeline.
            return self.text_encoder(ids)[0].repeat_interleave(n, dim=0)
        finally:
            if lora_scale is not None:
                unscale_lora_layers(self.text_encoder, lora_scale)

    def _latent_channels(self) -> int:
        """Channels of the latents the U-Net denoises (its input holds nothing else here)."""
        return self.unet.config.in_channels

    def _context(self, s: Sampling, device) -> Conditioning:
        """Text context (B·n, L, D) of the prompts, with the negatives' first under guidance (one U-Net pass
        covers both, as in StableDiffusionPipeline)."""
        lora_scale = (s.cross_attention_kwargs or {}).get("scale")
        context = self._encode(s.prompts, s.num_images_per_prompt, device, lora_scale)
        if s.guided:
            context = torch.cat([self._encode(s.negatives, s.num_images_per_prompt, device, lora_scale), context])
        return Conditioning(context.to(self.unet.dtype))

    def _unet_extra(self, model_in):
        """(model input, U-Net keyword arguments) for one step: nothing to add for text-to-image."""
        return model_in, {}

    def _denoise(self, latents, scheduler, pass_variance, cond: Conditioning, s: Sampling, start=0,
                 after_step=None):
        """The sampling loop from ``latents`` (pure noise, or noised to the step at index ``start`` of the
        schedule: image-to-image) to the denoised latents; ``after_step(i, latents)`` may change the latents
        after step i (inpainting)."""
        ch = latents.shape[1]
        scheduler.set_timesteps(s.num_inference_steps, device=latents.device)
        timesteps = scheduler.timesteps[start:]
        if start and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        # Only stochastic schedulers accept a generator in step(); passing it to others would raise TypeError.
        step_kwargs = {"generator": s.generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        last = scheduler.timesteps[-1]
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([latents] * 2) if s.guided else latents
            model_in, extra = self._unet_extra(scheduler.scale_model_input(model_in, t))
            if self._cuda_graphs:  # a new replay: the previous step's outputs were consumed
                torch.compiler.cudagraph_mark_step_begin()
            out = self.unet(model_in, t, encoder_hidden_states=cond.context,
                            cross_attention_kwargs=s.cross_attention_kwargs, return_dict=False, **cond.unet_kwargs,
                            **extra)[0]
            if self._cuda_graphs:  # the graph's output buffer is overwritten by the next replay
                out = out.clone()
            mean, var = out[:, :ch], out[:, ch:]  # var is empty without a learned variance
            if s.guided:
                mean, var = self._guide(mean, var, s)
            if pass_variance and t == last:
                # The last step adds no noise (DDPM Algorithm 2; improved-diffusion's respaced chain). With
                # respacing it ends at t > 0, where DDPMScheduler would add noise of the learned variance
                # between 0 and β'; its lower end (-1) gives std 1e-10.
                var = torch.full_like(var, -1.0)
            model_out = torch.cat([mean, var], dim=1) if pass_variance else mean
            latents = scheduler.step(model_out, t, latents, **step_kwargs, return_dict=False)[0]
            if after_step is not None:
                latents = after_step(i, latents)
        return latents

    @staticmethod
    def _guide(mean, var, s: Sampling):
        """Classifier-free guidance of the mean (the batch's first half unconditional); the conditional variance."""
        mean_uncond, mean_text = mean.chunk(2)
        mean = mean_uncond + s.guidance_scale * (mean_text - mean_uncond)
        var = var.chunk(2)[1]  # guidance applies to the mean only; keep the conditional variance
        if s.guidance_rescale > 0:
            # Lin et al. 2024, sec. 3.4, as StableDiffusionPipeline applies it: bring the guided output's std back
            # towards the conditional one's, against the over-exposure of strong guidance (worst at zero terminal
            # SNR).
            mean = rescale_noise_cfg(mean, mean_text, guidance_rescale=s.guidance_rescale)
        return mean, var

    def _decode(self, latents, output_type):
        """Denoised latents -> images of ``output_type`` (the latents themselves for "latent")."""
        if output_type == "latent":
            return latents
        if self.vae is None:  # pixel space: the denoised sample is the image
            decoded = latents.float()
        else:
            latents = unscale_latents(latents, *latent_scale_shift(self.vae))
            decoded = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        decoded = (decoded / 2 + 0.5).clamp(0, 1)
        return self.image_processor.postprocess(decoded, output_type=output_type,
                                                do_denormalize=[False] * decoded.shape[0])

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        negative_prompt=None,
        num_inference_steps=50,
        guidance_scale=7.5,
        height=None,
        width=None,
        num_images_per_prompt=1,
        generator=None,
        output_type="pil",
        return_dict=True,
        cross_attention_kwargs=None,
        guidance_rescale=0.0,
    ):
        height, width = self._size(height, width)
        s = self._sampling(prompt, negative_prompt, height, width, num_images_per_prompt=num_images_per_prompt,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           guidance_rescale=guidance_rescale, generator=generator, output_type=output_type,
                           cross_attention_kwargs=cross_attention_kwargs)
        return self._generate(s, return_dict)

    def _size(self, height, width) -> tuple:
        """(height, width) of the call, the U-Net's own size where None."""
        size = self.unet.config.sample_size
        default_h, default_w = (size, size) if _is_int(size) else tuple(size)
        return (default_h * self.vae_scale_factor if height is None else height,
                default_w * self.vae_scale_factor if width is None else width)

    def _generate(self, s: Sampling, return_dict: bool = True):
        """Text-to-image for the checked call ``s``: noise, the sampling loop, decoding."""
        scheduler, pass_variance = self._sampling_scheduler()
        device, dtype = self._execution_device, self.unet.dtype
        cond = self._context(s, device)
        f = self.vae_scale_factor
        shape = (s.batch, self._latent_channels(), s.height // f, s.width // f)
        # The schedule first: some schedulers' initial noise scale (Euler's with leading spacing, SDXL's) follows the
        # timesteps drawn, as in diffusers' pipelines.
        scheduler.set_timesteps(s.num_inference_steps, device=device)
        latents = randn_tensor(shape, generator=s.generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
        latents = self._denoise(latents, scheduler, pass_variance, cond, s)
        images = self._decode(latents, s.output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
