"""The networks of a diffusion run: tokenizer, text encoder, VAE, U-Net and training schedule, built from the
config or loaded from a pretrained pipeline folder, and the pipeline that samples with them."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DConditionModel

from ldm.diffusion.schedulers import load_noise_scheduler, make_noise_scheduler
from ldm.models.text import build_text_encoder, build_tokenizer
from ldm.models.vae import PIXEL_SPACE, load_vae
from pipelines.files import atomic_save_dir
from pipelines.latents import vae_scale_factor

logger = logging.getLogger(__name__)


@dataclass
class Components:
    tokenizer: object  # CLIPTokenizer
    text_encoder: object  # CLIPTextModel
    vae: object  # AutoencoderKL, or PixelSpace for diffusion on pixels
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler  # the training schedule; saved with the pipeline
    train_text_encoder: bool
    # The schedule the starting U-Net was trained with (DreamBooth's class images are drawn with it): the
    # pretrained folder's, which differs from `scheduler` after diffusion.pretrained_schedule=config.
    base_scheduler: DDPMScheduler | None = None
    # A second text side (Stable Diffusion XL's): from the pretrained folder (frozen unless the run trains the text
    # encoders), or new (`TextToImage.new_text_side`).
    tokenizer_2: object = None  # CLIPTokenizer
    text_encoder_2: object = None  # CLIPTextModelWithProjection
    force_zeros: bool = False  # the folder's force_zeros_for_empty_prompt: zeros stand for the empty caption

    def __post_init__(self):
        self.base_scheduler = self.base_scheduler or self.scheduler

    def text_encoders(self) -> list:
        """The text encoders, the first one's first."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    def text_sides(self) -> list[tuple]:
        """(tokenizer, text encoder) of each text side, the first one's first."""
        return list(zip([self.tokenizer, self.tokenizer_2], self.text_encoders()))


def build_components(cfg, captions: list[str], accelerator=None, resume_from: Path | None = None,
                     stage=None) -> Components:
    """The run's networks: from ``model.pretrained`` (a diffusers pipeline folder or a single file, see
    `pretrained_folder`; its schedule, prediction type, tokenizer, text encoder and VAE are kept), else new ones
    sized by the config with a tokenizer learned from ``captions`` (see `caption_tokenizer`). Built in this order
    so that a seed gives the same initial weights. ``stage`` (the trainer's, e.g. a super-resolution stage) says
    what more a new U-Net takes (``unet_inputs``) and checks the U-Net (``check_unet``); None: a text-to-image
    U-Net."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if cfg.model.pretrained:
        root = pretrained_folder(cfg, accelerator)
        base_scheduler = load_noise_scheduler(root / "scheduler")
        if cfg.diffusion.pretrained_schedule == "config":
            scheduler = make_noise_scheduler(cfg.diffusion, pixels=not (root / "vae").is_dir())
            logger.info("fine-tuning %s: switching its schedule and prediction type (%s, zero terminal SNR %s) to "
                        "diffusion.* (%s, zero terminal SNR %s)", root, base_scheduler.config.prediction_type,
                        base_scheduler.config.rescale_betas_zero_snr, cfg.diffusion.prediction_type,
                        cfg.diffusion.rescale_betas_zero_snr)
        else:
            scheduler = base_scheduler
            logger.info("fine-tuning %s: noise schedule and prediction type (%s) come from its scheduler; "
                        "diffusion.* schedule settings are ignored", root, scheduler.config.prediction_type)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True)
        second = second_text_side(root)
        vae = load_vae(str(root / "vae") if (root / "vae").is_dir() else PIXEL_SPACE)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
        train_text_encoder = bool(cfg.model.train_text_encoder)  # frozen unless asked
    else:
        scheduler = base_scheduler = make_noise_scheduler(cfg.diffusion, pixels=cfg.model.vae == PIXEL_SPACE)
        tc = cfg.model.text_encoder
        tokenizer = caption_tokenizer(cfg, captions, accelerator, resume_from)
        text_encoder = build_text_encoder(tokenizer, tc.hidden_size, tc.num_hidden_layers,
                                          tc.num_attention_heads, tc.intermediate_size)
        second = stage.new_text_side(tokenizer) if stage is not None else {}
        vae = load_vae(cfg.model.vae)
        width = text_encoder.config.hidden_size + (second["text_encoder_2"].config.hidden_size if second else 0)
        unet = build_unet(cfg, vae, width, stage.unet_inputs(vae.config.latent_channels) if stage is not None else {})
        train_text_encoder = cfg.model.train_text_encoder is not False
    expected_out = vae.config.latent_channels * (2 if cfg.diffusion.learned_variance else 1)
    if unet.config.out_channels != expected_out:
        raise ValueError(f"the U-Net has {unet.config.out_channels} output channels but diffusion.learned_variance="
                         f"{cfg.diffusion.learned_variance} needs {expected_out}")
    if cfg.model.vae_tiling:
        vae.enable_tiling()  # tiles of its own sample_size, overlapping by a quarter
    if stage is not None:
        stage.check_unet(unet, vae, str(cfg.model.pretrained or "the new U-Net"))
    return Components(tokenizer, text_encoder, vae, unet, scheduler, train_text_encoder, base_scheduler, **second)


def second_text_side(root: Path) -> dict:
    """A pipeline folder's second tokenizer and text encoder (Stable Diffusion XL's), frozen, with its
    ``force_zeros_for_empty_prompt``; {} for a folder with one text encoder."""
    import json

    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    if not (root / "text_encoder_2").is_dir():
        return {}
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    encoder = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", use_safetensors=True)
    return {"tokenizer_2": CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
            "text_encoder_2": encoder.requires_grad_(False).eval(),
            "force_zeros": bool(index.get("force_zeros_for_empty_prompt", True))}


def pretrained_folder(cfg, accelerator=None) -> Path | None:
    """The diffusers pipeline folder ``model.pretrained`` names (None when unset): the folder itself, or for a
    single ``.safetensors`` file in Stable Diffusion's (or SDXL's) original layout (`pipelines.single_file`) a
    folder made from it once, ``<data.cache_dir>/../single-file/<stem>-<hash of its path, size and time>``, and
    reused while the file is unchanged. The file's configs come from its metadata or its ``<stem>.config`` folder. With an
    ``accelerator`` the main process makes the folder while the others wait."""
    if not cfg.model.pretrained:
        return None
    path = Path(cfg.model.pretrained)
    if path.is_file():
        from pipelines.pickles import PICKLE_SUFFIXES

        if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
            raise ValueError(f"model.pretrained={str(path)!r} is a file but not .safetensors (or a .ckpt, read as "
                             f"tensors only): give a diffusers pipeline folder or a single file in Stable Diffusion's "
                             f"layout")
        from pipelines.single_file import materialize

        stat = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        folder = Path(cfg.data.cache_dir).parent / "single-file" / f"{path.stem}-{digest}"
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            if not (folder / "model_index.json").is_file():
                logger.info("model.pretrained=%s: writing it as a pipeline folder %s", path, folder)
                materialize(path, folder)
        return folder
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"model.pretrained={str(path)!r} is not a diffusers pipeline folder (no "
                                f"model_index.json) nor a single .safetensors file")
    return path


def caption_tokenizer(cfg, captions: list[str], accelerator=None, resume_from: Path | None = None):
    """A CLIP tokenizer learned from the training captions.

    BPE merges whose counts tie are broken differently in every process, so in a run the main process learns
    the tokenizer once and saves it in ``<run>/tokenizer``, and every process reads that folder; checkpoints
    keep a copy, which a resumed run reads instead. Without an accelerator it is learned in memory.
    """
    from transformers import CLIPTokenizer

    tc = cfg.model.text_encoder
    if accelerator is None:
        return build_tokenizer(captions, vocab_size=tc.vocab_size, max_length=tc.max_length)
    folder = cfg.run_dir / "tokenizer"
    kept = Path(resume_from) / "tokenizer" if resume_from is not None else None
    if accelerator.is_main_process:
        if kept is not None and (kept / "tokenizer_config.json").is_file():
            if kept.resolve() != folder.resolve():
                atomic_save_dir(lambda d: shutil.copytree(kept, d, dirs_exist_ok=True), folder)
        else:
            if kept is not None:
                logger.warning("checkpoint %s holds no tokenizer: learning it again from the captions; if its "
                               "merges tie, token ids may differ from the interrupted run's", resume_from)
            tokenizer = build_tokenizer(captions, vocab_size=tc.vocab_size, max_length=tc.max_length)
            atomic_save_dir(lambda d: tokenizer.save_pretrained(d), folder)
    accelerator.wait_for_everyone()
    return CLIPTokenizer.from_pretrained(folder)


def build_unet(cfg, vae, cross_attention_dim: int, inputs: dict) -> UNet2DConditionModel:
    """A new U-Net sized by ``model.unet`` for the VAE's latents at ``data.resolution``; ``inputs`` overrides or adds
    ``in_channels`` / ``num_class_embeds`` (a super-resolution stage's image channels and noise levels)."""
    u = cfg.model.unet
    f = vae_scale_factor(vae)
    if cfg.data.resolution % f:
        raise ValueError(f"data.resolution={cfg.data.resolution} must be a multiple of the VAE's factor {f}")
    latent = vae.config.latent_channels
    return UNet2DConditionModel(
        sample_size=cfg.data.resolution // f, **{"in_channels": latent, "num_class_embeds": None, **inputs},
        out_channels=latent * (2 if cfg.diffusion.learned_variance else 1),
        block_out_channels=list(u.block_out_channels), layers_per_block=u.layers_per_block,
        down_block_types=list(u.down_block_types), up_block_types=list(u.up_block_types),
        cross_attention_dim=cross_attention_dim, attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )
