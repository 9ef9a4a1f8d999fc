"""The diffusion trainer's settings: the sections of `LDMConfig` with their typed defaults, and `check_config`,
which rejects bad values before any data is read or model built (the generic loading is `ldm.engine.config`'s)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ldm.data.masks import MASK_SOURCES
from ldm.diffusion.gaussian import BETA_SCHEDULES, DISTANCES, LOSS_TYPES, PredictionType
from ldm.diffusion.schedulers import SAMPLERS
from ldm.diffusion.timesteps import TIMESTEP_SAMPLERS
from ldm.engine.config import Checker, EngineSettings, RunConfig, check_engine_settings
from ldm.methods.lora import DTYPES, LORA_FORMATS, LORA_TYPES
from ldm.methods.registry import METHODS
from ldm.trainer.optimizers import OPTIMIZERS
from ldm.trainer.stages import STAGES, stage_class
from pipelines.families import PIPELINES
from pipelines.fast import COMPILE_MODES

# The values a setting admits come from the registry that owns them.
BetaSchedule = typing.Literal[BETA_SCHEDULES]
PredictionName = typing.Literal[tuple(p.value for p in PredictionType)]
LossType = typing.Literal[LOSS_TYPES]
Distance = typing.Literal[DISTANCES]
TimestepSampling = typing.Literal[tuple(TIMESTEP_SAMPLERS)]
SamplerName = typing.Literal[tuple(SAMPLERS)]
Optimizer = typing.Literal[tuple(OPTIMIZERS)]
CompileMode = typing.Literal[("auto", *COMPILE_MODES)]
FinetuneMethod = typing.Literal[tuple(METHODS)]
LoraFormat = typing.Literal[LORA_FORMATS]
LoraType = typing.Literal[LORA_TYPES]
BaseDtype = typing.Literal[tuple(DTYPES)]
StageName = typing.Literal[tuple(STAGES)]
MaskSource = typing.Literal[MASK_SOURCES]
# Settings of the trainer's own.
PretrainedSchedule = typing.Literal["keep", "config"]
LatentPosterior = typing.Literal["sample", "mean"]
ModelFamily = typing.Literal[tuple(PIPELINES)]


@dataclass
class SourceConfig:
    """One entry of ``data.sources``: a source mixed with the others into every epoch."""

    dataset: str = ""  # as data.dataset: an image folder (metadata or caption files), a saved dataset, files
    repeats: float = 1.0  # times each image comes an epoch (fractions: on average)
    # Or the source's share of every epoch's places (relative to the other sources' weights; all sources give one
    # or none): its images come weight / sum(weights) x all images / its images times an epoch.
    weight: float | None = None
    caption_extension: str | None = None  # None: data.caption_extension
    shuffle_tags: bool | None = None  # None: data.shuffle_tags, and so on
    keep_tokens: int | None = None
    tag_dropout: float | None = None
    # Regularisation images (kohya-ss's is_reg): not trained on as the subject, but mixed into every step as
    # DreamBooth's class images are, their loss weighted by dreambooth.prior_loss_weight.
    regularisation: bool = False


@dataclass
class DataConfig:
    # Where the images come from: a built-in name ("shapes", "digits"), an image folder with
    # metadata.jsonl/csv, a `save_to_disk` folder, parquet/arrow file(s) or a glob, or a hub dataset id.
    dataset: str = "shapes"
    split: str = "train"
    data_root: str = "data"  # where built-in datasets are generated
    image_column: str = "image"
    caption_column: str = "text"  # a string or a list of strings per image (one drawn per step)
    # A folder of images without metadata is captioned by the file beside each image with this extension
    # (0001.png + 0001.txt; kohya-ss's other convention: .caption); in N_name sub-folders each image comes N times
    # an epoch.
    caption_extension: str = ".txt"
    # Comma-separated tag captions, changed every step (then the text encoder runs every step: nothing to cache):
    # the tags after the first keep_tokens shuffled, each dropped with probability tag_dropout.
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    # Several sources in one run (kohya-ss's subsets, SimpleTuner's backends), each with its repeats or weight and
    # its caption settings: [{dataset: /data/a, repeats: 2}, {dataset: /data/b, shuffle_tags: true}]. When given,
    # these are the training data and data.dataset is not read.
    sources: list[SourceConfig] = field(default_factory=list)
    resolution: int = 32  # side of the square images, or the area (resolution^2) of the buckets
    center_crop: bool = True  # else top-left (or random with random_crop)
    random_crop: bool = False  # a new crop every step: latents cannot be cached then
    # Zoom before the crop: images are resized to cover `crop_scale` times the target, so a crop cuts away up to
    # (crop_scale - 1) of each side (with random_crop, a new window each step). SDXL records each crop in its
    # time_ids; 1.0: resized just to cover.
    crop_scale: float = 1.0
    random_flip: bool = False  # horizontal flip with p=0.5; both orientations are cached
    alpha_background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB under transparent pixels
    # Images that cannot be decoded are skipped and listed in <run>/bad_images.jsonl; more than this fraction of
    # a source is an error naming them all.
    max_bad_fraction: float = 0.01
    # Streamed webdataset shards (data.dataset a .tar pattern, URL or folder of .tar files): samples whose image's
    # shorter side is below this are skipped and counted (0: none).
    min_image_size: int = 0
    # ... and are shuffled in windows of this many samples (their bytes held in memory: about 50-100 MB per process
    # at 500 for web images); 1: in shard order.
    shuffle_buffer: int = 500
    caption_dropout: float = 0.1  # probability of an empty caption, for classifier-free guidance
    # Aspect-ratio bucketing: images are grouped by the nearest (h, w) of area <= resolution^2 with sides
    # in multiples of bucket_step; every batch comes from one bucket.
    bucketing: bool = False
    bucket_step: int = 64
    bucket_max_ratio: float = 2.0
    cache_latents: bool = True  # VAE posterior (mean, std) computed once, memory-mapped from cache_dir
    cache_text: bool = True  # text embeddings computed once when the text encoder is frozen
    cache_dir: str = ".cache/latents"
    # Held-out images for the validation loss: a source like `dataset` (its `validation_split_name`
    # split), else a fraction of `dataset` held out; built-in datasets use their held-out split.
    validation_dataset: str | None = None
    validation_split_name: str = "validation"
    validation_fraction: float = 0.0
    validation_num_images: int = 64
    # Train on this many images of the source, drawn once with train.seed (diffusers' --max_train_samples); None: all.
    max_train_samples: int | None = None
    # Masked loss (ldm.data.masks): which pixels of each image the loss trains on, from a column (mask_column), a
    # <name>_mask.png beside each image (file) or the alpha channel (alpha); white trains, black does not. The
    # unmasked area keeps weight mask_floor (0: ignored); each image's loss is normalised by its mask's weight.
    mask_source: MaskSource = "none"
    mask_column: str = "mask"
    mask_floor: float = 0.0


@dataclass
class UNetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    # "cross" puts cross-attention in every block; the built-in presets use it at every level.
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    norm_num_groups: int = 32
    # Stable Diffusion XL U-Nets (model.family=sdxl): width of each of the six size/crop conditions' sinusoidal
    # embedding (SDXL: 256).
    addition_time_embed_dim: int = 256


@dataclass
class TextEncoderConfig:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 16
    vocab_size: int = 1000  # BPE vocabulary built from the training captions


@dataclass
class ModelConfig:
    # A Stable Diffusion 1.x/2.x diffusers folder or a pipeline folder of ours: VAE, tokenizer and
    # text encoder come from it and the text encoder is frozen. None trains from scratch.
    pretrained: str | None = None
    # The family of a model built from scratch: "sd" (one text encoder) or "sdxl" (two, the second's pooled
    # projection and SDXL's size/crop conditions added to the U-Net's time embedding). None: sd, or with
    # `pretrained` that model's family (a different value is an error).
    family: ModelFamily | None = None
    # "builtin" (shipped with the package), a diffusers AutoencoderKL folder, or "none": diffusion on pixels
    vae: str = "builtin"
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # None: trained when built from scratch, frozen when it comes from `pretrained`.
    train_text_encoder: bool | None = None
    # Encode and decode in overlapping tiles of the VAE's own sample_size (diffusers' enable_tiling), for images
    # larger than the VAE was trained on: the shipped 32 px VAE reconstructs 128 px shapes at 35.6 dB in tiles,
    # 13.6 dB whole. Super-resolution stages only (their exported pipeline records it).
    vae_tiling: bool = False


@dataclass
class DiffusionConfig:
    # Fine-tuning (model.pretrained): "keep" trains with the model's own noise schedule and prediction type;
    # "config" switches it to the settings below, e.g. to v-prediction at zero terminal SNR (docs/training.md,
    # "Prompts that set the layout"). From scratch the settings below are always used.
    pretrained_schedule: PretrainedSchedule = "keep"
    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    rescale_betas_zero_snr: bool = False
    prediction_type: PredictionName = "epsilon"
    learned_variance: bool = False  # Improved DDPM: U-Net outputs 2x channels, hybrid loss
    vlb_weight: float = 0.001  # lambda in L_simple + lambda * L_vlb
    # "simple": L_simple (L_hybrid with learned_variance). "vlb": the variational bound alone trains mean and
    # variance (Sohl-Dickstein et al. 2015); needs learned_variance; pair it with timestep_sampling=importance.
    loss_type: LossType = "simple"
    snr_gamma: float | None = None  # min-SNR-gamma weighting of L_simple; None = unweighted
    offset_noise: float = 0.0  # adds offset_noise * N(0, 1) per (image, channel) to the noise (Guttenberg 2023)
    # Density of training timesteps: uniform, logit_normal (t/T = sigmoid(N(mean, std)), as SD3), or
    # importance (Improved DDPM §3.3: p_t ∝ sqrt(E[L_t²]) over the last 10 losses of each t, uniform until
    # every t has them; each loss weighted by 1 / (T p_t); the history is checkpointed).
    timestep_sampling: TimestepSampling = "uniform"
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    # Train only timesteps in [min_timestep, max_timestep) (None: T), drawn by timestep_sampling over that range.
    min_timestep: int = 0
    max_timestep: int | None = None
    # Input perturbation (Ning et al. 2023): x_t is made with noise + input_perturbation * N(0, 1) while the
    # target keeps the noise (diffusers and kohya-ss use 0.1); 0: off.
    input_perturbation: float = 0.0
    # Debiased estimation (Yu et al. 2024): L_simple weighted by 1/sqrt(SNR) in epsilon units (for v-prediction
    # x SNR/(SNR+1), for sample x SNR; kohya-ss weighs v-prediction by 1/(SNR+1) instead).
    debiased_estimation: bool = False
    # L_simple's distance: l2 (squared error), huber (pseudo-Huber 2c(sqrt(d^2 + c^2) - c)) or smooth_l1
    # (2(sqrt(d^2 + c^2) - c)), c = huber_c: less swayed by outlier images (the logged term keeps the name mse).
    distance: Distance = "l2"
    huber_c: float = 0.1
    # The latent each step trains on: a fresh posterior sample z ~ q(z|x) (as Stable Diffusion's training does),
    # or the posterior mean. Use "mean" when the VAE's posterior std is large against its latents' spread
    # (docs/training.md, "The objective"): the model then need not draw the encoder's noise.
    latent_posterior: LatentPosterior = "sample"


@dataclass
class TrainConfig(EngineSettings):
    """The engine's settings (`EngineSettings`: seed, batch size, steps, learning rate and schedule, precision,
    EMA, logging, checkpoints, resume) and the diffusion trainer's own."""

    gradient_accumulation_steps: int = 1
    text_encoder_learning_rate: float | None = None  # None: same as learning_rate
    # adamw (fused on CUDA and CPU) | adamw8bit (needs bitsandbytes) | adafactor (factored state, no momentum) |
    # prodigy (estimates its own step size: learning_rate 1.0, scaling it)
    optimizer: Optimizer = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # torch.compile the U-Net in place: "regional" (each repeated block once: a short warm-up), "full" (one graph
    # for the whole U-Net; also true), false; "auto": regional on CUDA, off on CPU (where it pays only for runs
    # long enough to repay minutes of compilation).
    compile: bool | CompileMode = "auto"
    channels_last: bool | typing.Literal["auto"] = "auto"  # NHWC U-Net weights; "auto": on CUDA only
    ema_warmup: bool = True  # decay ramps up as 1 - (1 + step)^(-2/3) until ema_decay
    validate_every: int = 0  # validation loss, sample grid and (built-in data) scores; 0: start and end only
    score_num_images: int = 32  # images scored by the built-in scorer at each validation (0: off)


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)  # empty: taken from the data's captions
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    num_inference_steps: int = 50
    guidance_scale: float = 3.0
    scheduler: SamplerName = "ddpm"  # a diffusers scheduler made from the training config (ldm.diffusion.schedulers)


@dataclass
class FinetuneConfig:
    # full (every U-Net weight) | lora (low-rank adapters only, through peft) | textual_inversion (new token
    # embeddings only: placeholder_token's num_vectors rows of the text encoder's embedding table)
    method: FinetuneMethod = "full"
    # lora (low-rank products), loha (a Hadamard product of two: more expressive at the same size) or lokr (a
    # Kronecker product), as LyCORIS names them; lora_dora learns each output row's magnitude apart (DoRA)
    lora_type: LoraType = "lora"
    lora_dora: bool = False
    lora_rank: int = 4
    lora_alpha: float | None = None  # None: equal to the rank (scale 1)
    lora_dropout: float = 0.0
    lora_feed_forward: bool = False  # attention projections always; also the transformer feed-forwards
    lora_conv: bool = False  # also the ResNet convolutions
    lora_text_encoder: bool = False  # adapters on the text encoder's attention too
    base_dtype: BaseDtype = "fp32"  # the frozen base's dtype (match train.mixed_precision)
    # the exported adapters' layout: diffusers' (pytorch_lora_weights.safetensors), kohya-ss's for AUTOMATIC1111 /
    # ComfyUI / Forge (lora_kohya.safetensors), or both; diffusers' load_lora_weights and ours read either
    lora_format: LoraFormat = "diffusers"
    merged_export: bool = False  # also export a full pipeline with the adapters merged at merge_scale
    merge_scale: float = 1.0
    # textual inversion: the captions name the concept with placeholder_token (one word, not yet in the
    # vocabulary); its vectors start from initializer_token's embedding (a word the tokenizer keeps whole)
    placeholder_token: str = "<concept>"
    initializer_token: str | None = None
    num_vectors: int = 1


@dataclass
class DreamBoothConfig:
    # A folder of images of the subject (captions not needed): every one is trained with instance_prompt.
    instance_data: str | None = None
    instance_prompt: str = ""
    # Prior preservation: images of the class drawn by the base model (generated into class_data when it
    # holds fewer than num_class_images, then reused), trained with class_prompt at prior_loss_weight.
    class_prompt: str | None = None
    class_prompts: list[str] = field(default_factory=list)  # several, drawn in turn (instead of class_prompt)
    class_data: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_inference_steps: int = 50
    class_guidance_scale: float = 3.0


@dataclass
class SuperResolutionConfig:
    """A super-resolution stage of a cascade (``stage: super_resolution``): the U-Net sees, beside x_t, the
    training image downsampled to ``low_resolution`` and noised (conditioning augmentation), and the noise level
    as ``class_labels``. In latent space the low-resolution image sits at latent size, so data.resolution /
    low_resolution must be the VAE's factor; in pixel space (model.vae: none) it is upsampled to
    data.resolution, any integer factor."""

    low_resolution: int = 32  # side of the conditioning image (area-downsampled from the training image)
    # Augmentation level per training example, uniform over this inclusive range of steps of the 1000-step
    # low-resolution DDPM schedule (noise level s: sqrt(ᾱ_s) x + sqrt(1 - ᾱ_s) ε); [0, 0] turns it off. The top
    # is exported as the pipeline's max_noise_level.
    noise_levels: list[int] = field(default_factory=lambda: [0, 350])
    # Gaussian blur of the conditioning image before the noise (CDM's augmentation at high resolution), sigma in
    # low-resolution pixels uniform over this range; [0, 0] turns it off. Training only.
    blur_sigma: list[float] = field(default_factory=lambda: [0.0, 0.0])
    sample_noise_level: int = 0  # the augmentation level of validation samples
    # Train on random square crops of this side (pixels of the high-resolution image) cut from the cached latents
    # and low-resolution images at matching places, as CDM and Imagen train their SR stages; sampling stays at
    # full size (the U-Net is convolutional). null: whole images. A step then costs about (crop / resolution)².
    train_crop: int | None = None


@dataclass
class LDMConfig(RunConfig):
    name: str = "ldm"
    # "base": text-to-image; "super_resolution": a cascade stage that upsamples a low-resolution image
    stage: StageName = "base"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    super_resolution: SuperResolutionConfig = field(default_factory=SuperResolutionConfig)

    RUN_SETTINGS = RunConfig.RUN_SETTINGS + (
        "data.cache_dir", "data.data_root", "model.pretrained", "train.validate_every", "train.score_num_images",
        "train.compile", "train.channels_last", "train.gradient_checkpointing", "sample", "finetune.lora_format",
        "super_resolution.sample_noise_level")


def check_config(cfg: LDMConfig, num_processes: int = 1, strategy: str = "no") -> None:
    """Reject bad values of a diffusion run before any data is read or model built, section by section, then
    the fine-tuning method's and the stage's own. ``strategy`` is how Accelerate distributes the run ("no",
    "multi_gpu", "multi_cpu", "fsdp", "deepspeed")."""
    c = Checker(cfg)
    check_engine_settings(c)
    check_distribution(c, num_processes, strategy)
    check_train(c)
    check_data(c)
    check_model(c)
    check_diffusion(c)
    check_sample(c)
    stage_class(cfg).check(c)  # first: a model family refuses what it cannot train before a method's details
    METHODS[cfg.finetune.method].check(c)
    check_dreambooth(c)


DEEPSPEED_REFUSED = (
    "DeepSpeed is not supported: its checkpoints are pickles that its own loader unpickles (torch.load with "
    "weights_only=False), which this trainer never does with a file, and ZeRO-3 keeps the weights inside its "
    "engine, where validation and export cannot gather them; use FSDP (configs/accelerate/fsdp.yaml), whose "
    "fsdp_reshard_after_forward: false shards gradients and optimizer state as ZeRO-2 does, and true shards the "
    "weights too, as ZeRO-3 does")


def check_distribution(c: Checker, num_processes: int, strategy: str) -> None:
    """What the distribution strategy allows: the batch split evenly; under FSDP, bf16 or fp32 and torch's AdamW."""
    tc = c.cfg.train
    if strategy == "deepspeed":
        raise ValueError(DEEPSPEED_REFUSED)
    if strategy == "fsdp":
        c.require(tc.mixed_precision != "fp16", "train.mixed_precision",
                  "FSDP here trains in bf16 or fp32 ('bf16' or 'no'); fp16 would need a sharded gradient scaler")
        c.require(tc.optimizer == "adamw", "train.optimizer",
                  "FSDP shards the optimizer state as torch tensors; use 'adamw' (bitsandbytes' 8-bit state cannot be "
                  "sharded this way)")
    c.at_least("train.gradient_accumulation_steps", 1)
    per = num_processes * tc.gradient_accumulation_steps
    c.require(tc.batch_size % per == 0, "train.batch_size",
              f"must divide by processes x accumulation steps ({num_processes} x {tc.gradient_accumulation_steps} = "
              f"{per})")


def check_train(c: Checker) -> None:
    """The diffusion trainer's own ``train`` settings (the engine's are `check_engine_settings`')."""
    c.positive("train.text_encoder_learning_rate", optional=True)
    c.within("train.adam_beta1", 0, 1)
    c.within("train.adam_beta2", 0, 1)
    c.at_least("train.validate_every", 0)
    c.at_least("train.score_num_images", 0)


def check_data(c: Checker) -> None:
    d = c.cfg.data
    c.at_least("data.resolution", 1)
    c.within("data.caption_dropout", 0, 1)
    c.require(len(d.alpha_background) == 3 and all(0 <= v <= 255 for v in d.alpha_background),
              "data.alpha_background", "needs three values in [0, 255] (RGB)")
    c.within("data.max_bad_fraction", 0, 1, closed_high=True)
    c.at_least("data.bucket_step", 1)
    c.at_least("data.bucket_max_ratio", 1)
    c.within("data.validation_fraction", 0, 1)
    c.at_least("data.validation_num_images", 1)
    c.at_least("data.max_train_samples", 1, optional=True)
    c.at_least("data.crop_scale", 1)
    c.at_least("data.min_image_size", 0)
    c.at_least("data.shuffle_buffer", 1)
    c.require(d.caption_extension.startswith(".") and len(d.caption_extension) > 1, "data.caption_extension",
              "must be a file extension with its dot, such as '.txt' or '.caption'")
    c.at_least("data.keep_tokens", 0)
    c.within("data.tag_dropout", 0, 1)
    check_sources(c)
    from ldm.trainer.data import data_source_for

    if d.dataset:
        data_source_for(c.cfg).check(c)
    for key in ("data.dataset", "data.image_column", "data.caption_column", "data.cache_dir"):
        c.require(bool(c.get(key)), key, "must not be empty")
    if d.mask_source != "none":
        c.within("data.mask_floor", 0, 1)


def check_sources(c: Checker) -> None:
    """Each ``data.sources`` entry: a local map-style source, repeats or a weight (all entries weighted or none), its
    caption settings."""
    from ldm.data.stream import is_shard_spec

    d = c.cfg.data
    c.require(not (d.sources and c.cfg.dreambooth.instance_data), "data.sources",
              "cannot be mixed with dreambooth.instance_data; give the subject's images as a source instead")
    c.require(not d.sources or not all(e.regularisation for e in d.sources), "data.sources",
              "needs at least one source that is not regularisation images")
    c.require(not (any(e.regularisation for e in d.sources) and (c.cfg.dreambooth.class_prompt
                                                                   or c.cfg.dreambooth.class_prompts)),
              "data.sources", "regularisation images come either from a source or from dreambooth.class_prompt, "
                              "not both")
    weighted = {entry.weight is not None for entry in d.sources}
    c.require(len(weighted) <= 1, "data.sources", "needs a weight on every entry or on none")
    for k, e in enumerate(d.sources):
        key = f"data.sources[{k}]"
        c.require(bool(e.dataset) and not is_shard_spec(e.dataset), f"{key}.dataset",
                  f"must name an image folder, saved dataset or files (streamed shards go in data.dataset), got "
                  f"{e.dataset!r}")
        c.require(e.repeats >= 0, f"{key}.repeats", f"must be >= 0, got {e.repeats}")
        c.require(e.weight is None or e.weight > 0, f"{key}.weight", f"must be > 0, got {e.weight}")
        c.require(e.keep_tokens is None or e.keep_tokens >= 0, f"{key}.keep_tokens", f"must be >= 0, got {e.keep_tokens}")
        c.require(e.tag_dropout is None or 0 <= e.tag_dropout < 1, f"{key}.tag_dropout",
                  f"must be in [0, 1), got {e.tag_dropout}")
        c.require(e.caption_extension is None or (e.caption_extension.startswith(".") and len(e.caption_extension) > 1),
                  f"{key}.caption_extension", "must be a file extension with its dot, such as '.txt'")


def check_model(c: Checker) -> None:
    u, te = c.cfg.model.unet, c.cfg.model.text_encoder
    n = len(u.block_out_channels)
    c.require(n >= 1 and all(ch >= 1 for ch in u.block_out_channels), "model.unet.block_out_channels",
              "needs one positive channel count per level")
    for key in ("model.unet.down_block_types", "model.unet.up_block_types"):
        c.require(len(c.get(key)) == n, key, f"needs one block type per level ({n}, as block_out_channels)")
    c.at_least("model.unet.layers_per_block", 1)
    c.at_least("model.unet.attention_head_dim", 1)
    c.at_least("model.unet.norm_num_groups", 1)
    c.at_least("model.unet.addition_time_embed_dim", 2)
    c.require(all(ch % u.norm_num_groups == 0 for ch in u.block_out_channels), "model.unet.norm_num_groups",
              f"must divide every channel count {u.block_out_channels}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        c.at_least(f"model.text_encoder.{key}", 1)
    c.require(te.hidden_size % te.num_attention_heads == 0, "model.text_encoder.hidden_size",
              f"must divide by num_attention_heads={te.num_attention_heads}")
    c.at_least("model.text_encoder.max_length", 2)
    c.at_least("model.text_encoder.vocab_size", 514)  # 2 x 256 byte symbols + 2 special tokens


def uses_own_schedule(cfg: LDMConfig) -> bool:
    """Whether the run trains with the config's schedule: from scratch, or switched to with pretrained_schedule."""
    return not cfg.model.pretrained or cfg.diffusion.pretrained_schedule == "config"


def check_diffusion(c: Checker) -> None:
    cfg = c.cfg
    dif = cfg.diffusion
    c.at_least("diffusion.num_train_timesteps", 2)
    c.within("diffusion.beta_start", 0, 1, closed_low=False)
    c.within("diffusion.beta_end", 0, 1, closed_low=False, closed_high=True)
    c.require(dif.beta_start < dif.beta_end or dif.beta_schedule == "squaredcos_cap_v2", "diffusion.beta_start",
              f"must be below diffusion.beta_end={dif.beta_end}")
    c.at_least("diffusion.vlb_weight", 0)
    c.require(not (dif.loss_type == "vlb" and not dif.learned_variance and not cfg.model.pretrained),
              "diffusion.loss_type", "'vlb' trains the variance as well: it needs diffusion.learned_variance=true")
    c.positive("diffusion.snr_gamma", optional=True)
    c.at_least("diffusion.offset_noise", 0)
    c.require(math.isfinite(dif.timestep_mean), "diffusion.timestep_mean", "needs a finite number")
    c.positive("diffusion.timestep_std")
    c.at_least("diffusion.input_perturbation", 0)
    c.positive("diffusion.huber_c")
    c.at_least("diffusion.min_timestep", 0)
    top = dif.num_train_timesteps if uses_own_schedule(cfg) else 10**9  # a pretrained schedule's length: at run time
    c.require(dif.max_timestep is None or dif.min_timestep < dif.max_timestep <= top, "diffusion.max_timestep",
              f"must lie in (diffusion.min_timestep={dif.min_timestep}, {top}] or be null")
    c.require(dif.min_timestep < top, "diffusion.min_timestep", f"must be below the {top} training timesteps")
    c.require(not (uses_own_schedule(cfg) and dif.rescale_betas_zero_snr and dif.prediction_type == "epsilon"),
              "diffusion.prediction_type", "a zero-terminal-SNR schedule (rescale_betas_zero_snr) needs v_prediction "
              "or sample: at t=T-1 x_t holds no x_0, so ε cannot give it back")


def check_sample(c: Checker) -> None:
    cfg = c.cfg
    s, dif = cfg.sample, cfg.diffusion
    # a pretrained model keeps its own schedule unless told to switch: its length is not known here
    own = uses_own_schedule(cfg)
    top = dif.num_train_timesteps if own else 10**9
    c.require(1 <= s.num_inference_steps <= top, "sample.num_inference_steps",
              f"needs an integer in [1, diffusion.num_train_timesteps={dif.num_train_timesteps}]" if own
              else "needs an integer >= 1")
    c.require(math.isfinite(s.guidance_scale) and s.guidance_scale >= 1, "sample.guidance_scale",
              "needs a finite number >= 1 (1 turns guidance off)")
    c.require(len(s.seeds) > 0 and all(0 <= x < 2**63 for x in s.seeds), "sample.seeds",
              "needs at least one seed in [0, 2**63)")
    c.require(all(p.strip() for p in s.prompts), "sample.prompts", "prompts must not be empty")


def check_dreambooth(c: Checker) -> None:
    cfg = c.cfg
    db = cfg.dreambooth
    if db.instance_data:
        c.require(Path(db.instance_data).is_dir(), "dreambooth.instance_data", "needs an existing folder of images")
        c.require(bool(db.instance_prompt), "dreambooth.instance_prompt",
                  "dreambooth.instance_data needs the subject's prompt, e.g. 'a photo of sks dog'")
    if db.class_prompt or db.class_prompts:  # prior preservation
        c.require(bool(cfg.model.pretrained), "dreambooth.class_prompt",
                  "prior preservation needs model.pretrained: class images are drawn by the base model")
        c.require(not cfg.data.bucketing, "data.bucketing",
                  "prior preservation trains both halves in one forward and needs data.bucketing=false")
        c.at_least("dreambooth.num_class_images", 1)
        c.at_least("dreambooth.prior_loss_weight", 0)
        c.at_least("dreambooth.class_inference_steps", 1)
        c.require(math.isfinite(db.class_guidance_scale) and db.class_guidance_scale >= 1,
                  "dreambooth.class_guidance_scale", "needs a finite number >= 1")
