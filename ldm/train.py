"""Training of the text-conditional U-Net on cached VAE latents, under Accelerate.

    accelerate launch train_ldm.py --config configs/ldm/shapes.yaml [key=value ...]

Reads top-down: check the config, load data and components, cache latents and text embeddings,
prepare, resume, then steps (log, validate, checkpoint), then export.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType, set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from . import train_data as td
from .builtin_data import BUILTIN_DATASETS
from .checkpoint import CheckpointManager, list_checkpoints, resolve_resume, step_batches, step_seed
from .config import LDMConfig, save_config, to_yaml
from .diffusion import GaussianDiffusion
from .run import (MetricsWriter, atomic_save, atomic_save_dir, format_summary, make_accelerator, make_grid,
                  plot_curves, warn_if_cpu_threads_capped)
from .text import build_text_encoder, build_tokenizer, tokenize

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# 1. Components
# ----------------------------------------------------------------------------------------------

def make_noise_scheduler(cfg: LDMConfig) -> DDPMScheduler:
    """The training schedule as a diffusers scheduler: it is saved with the pipeline and the
    diffusion math is built from its config, so both always agree."""
    d = cfg.diffusion
    return DDPMScheduler(
        num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule, beta_start=d.beta_start,
        beta_end=d.beta_end, prediction_type=d.prediction_type, rescale_betas_zero_snr=d.rescale_betas_zero_snr,
        variance_type="learned_range" if d.learned_variance else "fixed_small",
        clip_sample=False,  # latents are not bounded like pixels
        timestep_spacing="trailing",  # sampling starts at t = T-1 (Lin et al. 2024)
        steps_offset=1,  # what StableDiffusionPipeline expects (it rewrites other values on load)
    )


def build_components(cfg: LDMConfig, captions: list[str]) -> dict:
    """Tokenizer, text encoder, VAE, U-Net and noise scheduler for a run."""
    from autoencoder.pretrained import load_vae
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler = make_noise_scheduler(cfg)
    if cfg.model.pretrained:
        root = Path(cfg.model.pretrained)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"model.pretrained={str(root)!r} is not a diffusers pipeline folder "
                                    f"(no model_index.json)")
        from diffusers import AutoencoderKL

        # The model was trained on its own noise schedule and prediction type: keep them.
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(root / "scheduler"), clip_sample=False)
        logger.info("fine-tuning %s: noise schedule and prediction type (%s) come from its scheduler; "
                    "diffusion.* schedule settings are ignored", root, scheduler.config.prediction_type)

        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
        train_text_encoder = bool(cfg.model.train_text_encoder)  # frozen unless asked
    else:
        tc = cfg.model.text_encoder
        tokenizer = build_tokenizer(captions, vocab_size=tc.vocab_size, max_length=tc.max_length)
        text_encoder = build_text_encoder(tokenizer, tc.hidden_size, tc.num_hidden_layers,
                                          tc.num_attention_heads, tc.intermediate_size)
        vae = load_vae(cfg.model.vae)
        unet = build_unet(cfg, vae, text_encoder.config.hidden_size)
        train_text_encoder = cfg.model.train_text_encoder is not False
    expected_out = vae.config.latent_channels * (2 if cfg.diffusion.learned_variance else 1)
    if unet.config.out_channels != expected_out:
        raise ValueError(f"the U-Net has {unet.config.out_channels} output channels but diffusion.learned_variance="
                         f"{cfg.diffusion.learned_variance} needs {expected_out}")
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "scheduler": scheduler, "train_text_encoder": train_text_encoder}


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_unet(cfg: LDMConfig, vae, cross_attention_dim: int) -> UNet2DConditionModel:
    u = cfg.model.unet
    f = vae_scale_factor(vae)
    if cfg.data.resolution % f:
        raise ValueError(f"data.resolution={cfg.data.resolution} must be a multiple of the VAE's factor {f}")
    latent = vae.config.latent_channels
    return UNet2DConditionModel(
        sample_size=cfg.data.resolution // f, in_channels=latent,
        out_channels=latent * (2 if cfg.diffusion.learned_variance else 1),
        block_out_channels=list(u.block_out_channels), layers_per_block=u.layers_per_block,
        down_block_types=list(u.down_block_types), up_block_types=list(u.up_block_types),
        cross_attention_dim=cross_attention_dim, attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )


# ----------------------------------------------------------------------------------------------
# 2. Sampling during and after training
# ----------------------------------------------------------------------------------------------

def make_pipeline(components: dict, unet, text_encoder, scheduler_name: str = "ddpm"):
    from pipelines import LDMPipeline

    return LDMPipeline(vae=components["vae"], text_encoder=text_encoder, tokenizer=components["tokenizer"],
                       unet=unet, scheduler=sampling_scheduler(components["scheduler"], scheduler_name))


def sampling_scheduler(train_scheduler: DDPMScheduler, name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddpm":
        return DDPMScheduler.from_config(train_scheduler.config)
    if name == "ddim":
        return DDIMScheduler.from_config(train_scheduler.config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(train_scheduler.config)
    raise ValueError(f"sample.scheduler={name!r} is not one of 'ddpm', 'ddim', 'dpm++'")


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seeds: list[int], num_inference_steps: int,
                guidance_scale: float) -> Image.Image:
    """One row per prompt, one column per seed; each image from its own seeded generator."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for prompt in prompts:
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        images += pipe([prompt] * len(seeds), generator=gens, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale).images
    return make_grid(images, ncols=len(seeds))



# ----------------------------------------------------------------------------------------------
# 3. The objective
# ----------------------------------------------------------------------------------------------

TIMESTEP_SAMPLING = ("uniform", "logit_normal")
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}


def sample_timesteps(n: int, num_timesteps: int, dcfg, gen: torch.Generator) -> torch.Tensor:
    """(n,) training timesteps in [0, T): uniform (DDPM), or logit-normal t/T = σ(N(μ, s²)) (Esser et al.
    2024, §3.1), which spends more of training on the middle of the schedule."""
    if dcfg.timestep_sampling == "uniform":
        return torch.randint(0, num_timesteps, (n,), generator=gen)
    if dcfg.timestep_sampling == "logit_normal":
        u = torch.sigmoid(dcfg.timestep_mean + dcfg.timestep_std * torch.randn(n, generator=gen))
        return (u * num_timesteps).long().clamp(max=num_timesteps - 1)
    raise ValueError(f"diffusion.timestep_sampling={dcfg.timestep_sampling!r} is not one of {TIMESTEP_SAMPLING}")


def step_noise(seed: int, step: int, n: int, latent_shape: tuple, cfg: LDMConfig, num_timesteps: int,
               stream: int = 0) -> dict:
    """The random draws of one step's global batch (CPU, seeded by the step): timesteps (B,), the
    diffusion noise and the posterior-sample noise (B, C, h, w), and the caption-dropout mask (B,)."""
    g = torch.Generator().manual_seed(step_seed(seed, step, stream))
    d = cfg.diffusion
    t = sample_timesteps(n, num_timesteps, d, g)
    noise = torch.randn((n, *latent_shape), generator=g)
    posterior = torch.randn((n, *latent_shape), generator=g)
    drop = torch.rand(n, generator=g) < cfg.data.caption_dropout
    if d.offset_noise:  # a per-(image, channel) constant lets the model change the mean brightness
        noise = noise + d.offset_noise * torch.randn((n, latent_shape[0], 1, 1), generator=g)
    return {"t": t, "noise": noise, "posterior": posterior, "drop": drop}


def diffusion_loss(diffusion: GaussianDiffusion, unet, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   context: torch.Tensor, cfg: LDMConfig) -> dict:
    """Loss terms (B,) of the U-Net on scaled latents z0 (B, C, h, w) under text context (B, L, D)."""
    return diffusion.training_losses(lambda x, tt: unet(x, tt, encoder_hidden_states=context).sample, z0, t, noise,
                                     snr_gamma=cfg.diffusion.snr_gamma, vlb_weight=cfg.diffusion.vlb_weight)


@torch.no_grad()
def validation_loss(diffusion: GaussianDiffusion, unet, text_encoder, mean: torch.Tensor, std: torch.Tensor,
                    input_ids: torch.Tensor, scale: float, shift: float, seed: int = 0) -> dict:
    """Unweighted loss terms on fixed images, timesteps (spread over [0, T)) and noise, so that values
    from different steps of a run are comparable."""
    g = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    z0 = ((mean + std * torch.randn(mean.shape, generator=g) - shift) * scale).to(device)
    noise = torch.randn(z0.shape, generator=g).to(device)
    t = torch.linspace(0, diffusion.num_timesteps - 1, len(z0)).round().long().to(device)
    was_training = unet.training, text_encoder.training
    unet.eval(), text_encoder.eval()
    context = text_encoder(input_ids.to(device))[0]
    terms = diffusion.training_losses(lambda x, tt: unet(x, tt, encoder_hidden_states=context).sample,
                                      z0, t, noise)
    unet.train(was_training[0]), text_encoder.train(was_training[1])
    return {f"val_{k}": v.mean().item() for k, v in terms.items()}


def check_latent_scale(mean: torch.Tensor, std: torch.Tensor, scale: float, shift: float,
                       tolerance: float = 0.25) -> float:
    """Std of scaled posterior samples; warns when far from 1 (a ``scaling_factor`` unfit for this data)."""
    g = torch.Generator().manual_seed(0)
    z0 = (mean + std * torch.randn(mean.shape, generator=g) - shift) * scale
    value = float(z0.std())
    if abs(value - 1.0) > tolerance:
        logger.warning("scaled latents have std %.3f, not ~1: the VAE's scaling_factor does not fit this data "
                       "(measure it with train_autoencoder.py or set it in the VAE's config.json)", value)
    return value


def make_optimizer(params: list[dict], tc, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"betas": (tc.adam_beta1, tc.adam_beta2), "weight_decay": tc.weight_decay}
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda" or None, **kwargs)
    if tc.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                              "use train.optimizer=adamw without it") from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ValueError(f"train.optimizer={tc.optimizer!r} is not one of {OPTIMIZERS}")


def check_config(cfg: LDMConfig, num_processes: int, distributed_type=DistributedType.NO) -> None:
    """Reject bad values before any data is read or model built."""
    tc, d = cfg.train, cfg.data
    if distributed_type == DistributedType.DEEPSPEED and tc.gradient_accumulation_steps > 1:
        raise ValueError(f"train.gradient_accumulation_steps={tc.gradient_accumulation_steps} is not supported under "
                         f"DeepSpeed, whose engine accumulates by itself; use 1 and a larger per-GPU batch")
    per = num_processes * tc.gradient_accumulation_steps
    if tc.gradient_accumulation_steps < 1:
        raise ValueError(f"train.gradient_accumulation_steps={tc.gradient_accumulation_steps} must be >= 1")
    if tc.batch_size % per:
        raise ValueError(f"train.batch_size={tc.batch_size} must divide by processes x accumulation steps "
                         f"({num_processes} x {tc.gradient_accumulation_steps} = {per})")
    if tc.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule={tc.lr_schedule!r} is not one of {sorted(LR_SCHEDULES)}")
    if tc.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer={tc.optimizer!r} is not one of {OPTIMIZERS}")
    if cfg.diffusion.timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"diffusion.timestep_sampling={cfg.diffusion.timestep_sampling!r} is not one of "
                         f"{TIMESTEP_SAMPLING}")
    if tc.ema_decay is not None and not 0 < tc.ema_decay < 1:
        raise ValueError(f"train.ema_decay={tc.ema_decay} must be in (0, 1) or null")
    if not 0 <= d.caption_dropout < 1:
        raise ValueError(f"data.caption_dropout={d.caption_dropout} must be in [0, 1)")
    sampling_scheduler(DDPMScheduler(), cfg.sample.scheduler)  # raises on an unknown name
    fc, db = cfg.finetune, cfg.dreambooth
    if fc.method not in ("full", "lora"):
        raise ValueError(f"finetune.method={fc.method!r} is not one of ['full', 'lora']")
    if fc.method == "lora" and not cfg.model.pretrained:
        raise ValueError("finetune.method=lora needs model.pretrained: the model whose weights the adapters adapt")
    if fc.method == "lora" and fc.base_dtype != "fp32" and fc.base_dtype != tc.mixed_precision:
        raise ValueError(f"finetune.base_dtype={fc.base_dtype!r} needs train.mixed_precision={fc.base_dtype!r} "
                         f"(got {tc.mixed_precision!r}) so that inputs meet the base weights in that dtype")
    if (db.class_prompt or db.class_prompts) and not cfg.model.pretrained:
        raise ValueError("dreambooth.class_prompt needs model.pretrained: class images are drawn by the base model")
    if (db.class_prompt or db.class_prompts) and d.bucketing:
        raise ValueError("dreambooth.class_prompt (prior preservation) trains both halves in one forward and "
                         "needs data.bucketing=false")
    if db.instance_data and not db.instance_prompt:
        raise ValueError("dreambooth.instance_data needs dreambooth.instance_prompt, e.g. 'a photo of sks dog'")


# ----------------------------------------------------------------------------------------------
# 4. Validation: loss on held-out images, a sample grid, and the built-in scorer
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def ema_weights(ema, params: list):
    """Run the body with the EMA weights in ``params`` (when EMA is on), then put the trained ones back."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


@torch.no_grad()
def builtin_scores(pipe, dataset: str, num_images: int, cfg: LDMConfig) -> dict:
    """The built-in scorer on images of the held-out evaluation prompts (seeds as ``ldm.evaluate``)."""
    from .builtin_data import eval_prompts, score
    from .evaluate import generate_for_prompts

    base = eval_prompts(dataset)
    per = -(-num_images // len(base))  # ceil: every prompt gets the same number of images, in one batch
    prompts, images = generate_for_prompts(pipe, base, per, batch_size=per * len(base),
                                           num_inference_steps=cfg.sample.num_inference_steps,
                                           guidance_scale=cfg.sample.guidance_scale)
    return {f"score_{k}": v for k, v in score(dataset, images, prompts).items() if k.endswith("_accuracy")}


# ----------------------------------------------------------------------------------------------
# 5. The run
# ----------------------------------------------------------------------------------------------

def train(cfg: LDMConfig) -> dict:
    accelerator = make_accelerator(cfg.train.mixed_precision)
    tc = cfg.train
    check_config(cfg, accelerator.num_processes, accelerator.distributed_type)
    set_seed(tc.seed)
    run_dir = cfg.run_dir
    resume_from = resolve_resume(tc.resume, run_dir / "checkpoints")  # a wrong path fails before any work
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    warn_if_cpu_threads_capped(accelerator)
    device = accelerator.device

    # 1. Data and components.
    with accelerator.main_process_first():  # built-in data is generated once, by the main process
        train_split, val_split, heldout = td.load_splits(cfg)
    comp = build_components(cfg, train_split.captions)
    vae, text_encoder, unet, tokenizer = comp["vae"], comp["text_encoder"], comp["unet"], comp["tokenizer"]
    train_te = comp["train_text_encoder"]
    factor = vae_scale_factor(vae)
    td.check_sizes(cfg, train_split, factor)
    vae.requires_grad_(False).eval().to(device)
    fc, db = cfg.finetune, cfg.dreambooth
    class_split = None
    if db.class_prompts or db.class_prompt:  # DreamBooth prior preservation: the base model's own images
        from .dreambooth import ensure_class_images

        def base_pipeline():
            return make_pipeline(comp, unet.to(device).eval(), text_encoder.to(device).eval(), "ddpm")

        class_dir = ensure_class_images(base_pipeline, db.class_data or run_dir / "class_images",
                                        db.class_prompts or [db.class_prompt],
                                        db.num_class_images, tc.seed, db.class_inference_steps,
                                        db.class_guidance_scale, accelerator)
        unet.train()
        with accelerator.main_process_first():
            class_split = td.class_split(cfg, class_dir)
    if fc.method == "lora":  # adapters only: the base stays frozen (and may be kept in bf16/fp16)
        from .lora import add_lora

        train_te = fc.lora_text_encoder
        adapters = add_lora(unet, text_encoder, fc)
    else:
        text_encoder.requires_grad_(train_te)
    diffusion = GaussianDiffusion.from_scheduler_config(comp["scheduler"].config)
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    # 2. Caches: VAE posteriors (unless every step crops anew) and, for a frozen encoder, text embeddings.
    vae_fp = td.vae_fingerprint(vae)
    use_latent_cache = cfg.data.cache_latents and not cfg.data.random_crop
    if cfg.data.cache_latents and cfg.data.random_crop:
        logger.info("data.random_crop=true: each step crops anew, so images are encoded every step (no latent cache)")
    latents = td.latent_cache(vae, vae_fp, train_split, cfg, accelerator, cfg.data.random_flip) \
        if use_latent_cache else None
    val_cache = td.latent_cache(vae, vae_fp, val_split, cfg, accelerator, flips=False)
    no_flip = torch.zeros(len(val_split), dtype=torch.bool)
    val_mean, val_std = td.cached_posterior(val_cache, list(range(len(val_split))), no_flip)  # (V, C, h, w)
    latent_std = check_latent_scale(val_mean, val_std, scale, shift)
    class_latents = None
    if class_split is not None and use_latent_cache:
        class_latents = td.latent_cache(vae, vae_fp, class_split, cfg, accelerator, cfg.data.random_flip)
    # Token ids of every caption: the training split's, then the class split's (from class_offset on).
    class_offset = len(train_split.captions)
    input_ids = tokenize(tokenizer, train_split.captions + (class_split.captions if class_split else []))  # (N, L)
    empty_ids = tokenize(tokenizer, [""])[0]
    val_ids = tokenize(tokenizer, val_split.first_captions())
    text = td.text_cache(text_encoder, input_ids, empty_ids, cfg, accelerator) \
        if cfg.data.cache_text and not train_te else None
    sampler = td.batch_plan(train_split, cfg)
    class_sampler = td.batch_plan(class_split, cfg) if class_split is not None else None

    # 3. Optimisation.
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:  # transformers 5 renamed the method
            (getattr(text_encoder, "activation_checkpointing_enable", None)
             or text_encoder.gradient_checkpointing_enable)()
    if tc.compile:  # in place: parameter names, checkpoints and exports are unchanged
        unet.compile()
    if fc.method == "lora":
        params = [{"params": adapters, "lr": tc.learning_rate}]
    else:
        params = [{"params": list(unet.parameters()), "lr": tc.learning_rate}]
        if train_te:
            params.append({"params": list(text_encoder.parameters()),
                           "lr": tc.text_encoder_learning_rate or tc.learning_rate})
    optimizer = make_optimizer(params, tc, device)
    # The LR schedule counts optimizer steps whatever the number of processes (so a checkpoint resumes on
    # another count); it is stepped here, not by Accelerate, and checkpointed as a registered object.
    n_proc = accelerator.num_processes
    lr_sched = get_scheduler(LR_SCHEDULES[tc.lr_schedule], optimizer, num_warmup_steps=tc.warmup_steps,
                             num_training_steps=tc.max_steps)
    if train_te:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:  # a frozen encoder has no gradients for DDP to synchronise: it is only moved
        unet, optimizer = accelerator.prepare(unet, optimizer)
        text_encoder.to(device)
    accelerator.register_for_checkpointing(lr_sched)
    # EMA averages what trains in the U-Net: every weight, or the adapters only under LoRA.
    ema_params = [p for p in accelerator.unwrap_model(unet).parameters() if p.requires_grad]
    ema = None
    if tc.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(ema_params, decay=tc.ema_decay, use_ema_warmup=tc.ema_warmup, power=2 / 3, foreach=True)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    # 4. Resume.
    ckpt = CheckpointManager(accelerator, run_dir / "checkpoints", tc.keep_last)
    start_step = ckpt.load(resume_from, len(sampler)) if resume_from is not None else 0
    metrics = MetricsWriter(run_dir / "metrics.jsonl", accelerator.is_main_process, fresh=start_step == 0,
                            tensorboard_dir=run_dir / "tensorboard" if tc.tensorboard else None)
    metrics.truncate_after(start_step)  # rows an interrupted run wrote after its last checkpoint

    unet_u = accelerator.unwrap_model(unet)
    te_u = accelerator.unwrap_model(text_encoder)

    def validate(step: int, full: bool) -> dict:
        """Validation loss (all steps), plus sample grid and built-in scores (``full``); main process."""
        row = {}
        if accelerator.is_main_process:
            with ema_weights(ema, ema_params), accelerator.autocast():
                row = validation_loss(diffusion, unet_u, te_u, val_mean, val_std, val_ids, scale, shift, tc.seed)
                if full:
                    unet_u.eval(), te_u.eval()
                    pipe = make_pipeline(comp, unet_u, te_u, cfg.sample.scheduler)
                    prompts = cfg.sample.prompts or sorted(set(train_split.captions))[:8]
                    grid = sample_grid(pipe, prompts, cfg.sample.seeds, cfg.sample.num_inference_steps,
                                       cfg.sample.guidance_scale)
                    atomic_save(lambda p: grid.save(p, format="PNG"), run_dir / "samples" / f"step-{step}.png")
                    metrics.image("samples", grid, step)
                    builtin = cfg.data.dataset in BUILTIN_DATASETS and not cfg.dreambooth.instance_data
                    if builtin and tc.score_num_images > 0:
                        row.update(builtin_scores(pipe, cfg.data.dataset, tc.score_num_images, cfg))
                    unet_u.train(), te_u.train(train_te)
            metrics.write(step=step, **row)
        accelerator.wait_for_everyone()
        return row

    # 5. Steps.
    if start_step == 0:
        validate(0, full=False)
    accum, rank = tc.gradient_accumulation_steps, accelerator.process_index
    micro = tc.batch_size // (n_proc * accum)  # images per process per forward
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    pixel_items = None if use_latent_cache else td.PixelItems(train_split, cfg, cfg.data.random_crop)
    class_pixels = None if use_latent_cache or class_split is None else \
        td.PixelItems(class_split, cfg, cfg.data.random_crop)
    empty_embed = torch.from_numpy(np.array(text["empty"][0])) if text is not None else None
    c_lat = vae.config.latent_channels

    def plan(split, cache, pixels, batch, step, stream: int, offset: int) -> dict:
        """One global batch's draws (noise, timesteps, captions, flips), the same on every process."""
        h, w = split.sizes[batch[0]]
        draws = step_noise(tc.seed, step, len(batch), (c_lat, h // factor, w // factor), cfg,
                           diffusion.num_timesteps, stream)
        aug = td.step_augment(tc.seed, step, len(batch), stream + 1)
        return {"cache": cache, "pixels": pixels, "batch": batch, "draws": draws, "crop": aug["crop_seed"],
                "flips": aug["flip"] & cfg.data.random_flip,
                "cap": td.caption_index(split, batch, aug["caption_u"]) + offset}  # (B,) into input_ids

    def inputs(part: dict, sl: slice) -> tuple:
        """(z0, t, noise, context) of this process's slice ``sl`` of a planned batch."""
        items, draws = part["batch"][sl], part["draws"]
        if part["cache"] is not None:
            mean, std = td.cached_posterior(part["cache"], items, part["flips"][sl])
        else:
            pixels = torch.stack([part["pixels"][(i, f, s)] for i, f, s in
                                  zip(items, part["flips"][sl].tolist(), part["crop"][sl].tolist())])
            mean, std = td.encode(vae, pixels)
        # z0 ~ q(z | x): a fresh draw from the posterior each step, scaled to unit variance.
        z0 = (mean.to(device) + std.to(device) * draws["posterior"][sl].to(device) - shift) * scale
        drop = draws["drop"][sl]  # classifier-free guidance: the empty caption with probability caption_dropout
        if text is not None:
            context = td.take(text["embeds"], part["cap"][sl])
            context[drop] = empty_embed
            context = context.to(device)
        else:
            ids = input_ids[part["cap"][sl]]
            ids[drop] = empty_ids
            context = text_encoder(ids.to(device))[0]  # (b, L, D)
        return z0, draws["t"][sl].to(device), draws["noise"][sl].to(device), context

    window, window_steps, skipped, t_window, t_start = {}, 0, 0, time.time(), time.time()
    row: dict = {}
    unet.train()
    text_encoder.train(train_te)
    bar = tqdm(total=tc.max_steps, initial=start_step, desc="training", disable=not accelerator.is_main_process)
    step = start_step
    for step, epoch, batch in step_batches(sampler, start_step, tc.max_steps):
        parts = [plan(train_split, latents, pixel_items, batch, step, 0, 0)]
        if class_split is not None:  # DreamBooth: the class half of the batch, for prior preservation
            parts.append(plan(class_split, class_latents, class_pixels, td.batch_at(class_sampler, step), step, 2,
                              class_offset))
        for k in range(accum):
            sl = slice((k * n_proc + rank) * micro, (k * n_proc + rank + 1) * micro)  # this process's share
            with contextlib.ExitStack() as no_sync:
                if k < accum - 1:  # gradients are all-reduced once, on the last micro-batch
                    no_sync.enter_context(accelerator.no_sync(unet))
                    if train_te:
                        no_sync.enter_context(accelerator.no_sync(text_encoder))
                with accelerator.autocast():
                    # One forward over both halves (as DDP wants), split again for the two loss terms.
                    z0, t, noise, context = (torch.cat(x) for x in zip(*(inputs(part, sl) for part in parts)))
                    all_terms = diffusion_loss(diffusion, unet, z0, t, noise, context, cfg)
                    n = sl.stop - sl.start
                    terms = {key: v[:n] for key, v in all_terms.items()}
                    loss = terms["loss"].mean()
                    if len(parts) > 1:  # prior-preservation loss (Ruiz et al. 2023, eq. 2)
                        terms["prior_loss"] = all_terms["loss"][n:]
                        loss = loss + db.prior_loss_weight * terms["prior_loss"].mean()
                    loss = loss / accum
                accelerator.backward(loss)
            for key, v in terms.items():  # sums stay on the device: one host sync per log line
                window[key] = window.get(key, 0.0) + v.detach().mean() / accum
        if tc.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, tc.max_grad_norm)
        optimizer.step()
        if accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
            skipped += 1
        else:
            lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(ema_params)
        done, window_steps = step + 1, window_steps + 1
        bar.update(1)
        if done % tc.log_every == 0 or done == tc.max_steps:
            means = accelerator.reduce(torch.stack(list(window.values())) / window_steps, reduction="mean")
            row = {"step": done, "epoch": epoch, **{k: v.item() for k, v in zip(window, means)},
                   "lr": lr_sched.get_last_lr()[0],
                   "images_per_s": window_steps * tc.batch_size / (time.time() - t_window)}
            if cfg.train.mixed_precision == "fp16":
                row["skipped_steps"] = skipped
            metrics.write(**row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            window, window_steps, t_window = {}, 0, time.time()
        if tc.checkpoint_every and (done % tc.checkpoint_every == 0 or done == tc.max_steps):
            ckpt.save(done, len(sampler), to_yaml(cfg))
        if tc.validate_every and done % tc.validate_every == 0 and done < tc.max_steps:
            validate(done, full=True)
        step = done
    bar.close()
    train_time = time.time() - t_start
    final_val = validate(step, full=True)

    # 6. Export (EMA weights when EMA is on): the pipeline folder, the loss plot and a summary.
    result = {"steps": step, "train_time_s": round(train_time, 1),
              "images_per_s": round((step - start_step) * tc.batch_size / max(train_time, 1e-9), 1),
              "latent_std": round(latent_std, 3), "num_processes": n_proc}
    if accelerator.is_main_process:
        saved_models = {}
        with ema_weights(ema, ema_params):
            if fc.method == "lora":  # the adapters alone, and a merged pipeline when asked
                from .lora import LORA_FILE, merge_into, save_lora

                atomic_save_dir(lambda d: save_lora(d, unet_u, te_u), run_dir / "lora")
                saved_models["lora"] = run_dir / "lora" / LORA_FILE
                if fc.merged_export:
                    from pipelines import LDMPipeline

                    merged = merge_into(LDMPipeline.from_pretrained(cfg.model.pretrained), run_dir / "lora",
                                        fc.merge_scale)
                    merged.scheduler = sampling_scheduler(comp["scheduler"], cfg.sample.scheduler)
                    atomic_save_dir(lambda d: merged.save_pretrained(d, safe_serialization=True),
                                    run_dir / "pipeline")
                    saved_models["pipeline"] = run_dir / "pipeline"
            else:
                pipe = make_pipeline(comp, unet_u.eval(), te_u.eval(), cfg.sample.scheduler)
                atomic_save_dir(lambda d: pipe.save_pretrained(d, safe_serialization=True), run_dir / "pipeline")
                saved_models["pipeline"] = run_dir / "pipeline"
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", keys=("loss", "mse", "val_loss"))
        vals = [r["val_loss"] for r in metrics.rows() if "val_loss" in r]
        final = {"final_loss": round(row.get("loss", math.nan), 5), **result,
                 "best_val_loss": round(min(vals), 5) if vals else None,
                 **{k: v for k, v in final_val.items() if k.startswith("score_")}}
        if tc.mixed_precision == "fp16":
            final["skipped_steps"] = skipped
        metrics.write(step=step, **final)
        metrics.close()
        saved = ", ".join(str(p) for p in list_checkpoints(ckpt.root)) or "-"
        print(format_summary(f"run {cfg.name}", {
            **final, "validation set": "held-out" if heldout else "training images (no held-out split given)",
            "weights": "EMA" if ema is not None else "trained", **saved_models,
            "samples": run_dir / "samples" / f"step-{step}.png", "loss plot": run_dir / "loss.png",
            "metrics": run_dir / "metrics.jsonl", "checkpoints": saved}))
        result = final
    accelerator.end_training()
    return result

