"""Typed configuration: defaults live in dataclasses, YAML presets and ``key=value`` overrides change them.

    cfg = load_config(LDMConfig, "configs/ldm/shapes.yaml", ["train.max_steps=100", "name=quick"])

Unknown keys are errors (a typo must not silently train with a default). The resolved config is
written to the run folder and into every checkpoint by the trainers.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class DataConfig:
    # Where the images come from: a built-in name ("shapes", "digits"), an image folder with
    # metadata.jsonl/csv, a `save_to_disk` folder, parquet/arrow file(s) or a glob, or a hub dataset id.
    dataset: str = "shapes"
    split: str = "train"
    data_root: str = "data"  # where built-in datasets are generated
    image_column: str = "image"
    caption_column: str = "text"  # a string or a list of strings per image (one drawn per step)
    resolution: int = 32  # side of the square images, or the area (resolution^2) of the buckets
    center_crop: bool = True  # else top-left (or random with random_crop)
    random_crop: bool = False  # a new crop every step: latents cannot be cached then
    random_flip: bool = False  # horizontal flip with p=0.5; both orientations are cached
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


@dataclass
class UNetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    # "cross" puts cross-attention in every block; the built-in presets use it at every level.
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    norm_num_groups: int = 32


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
    vae: str = "builtin"  # "builtin" (shipped with the package) or a diffusers AutoencoderKL folder
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # None: trained when built from scratch, frozen when it comes from `pretrained`.
    train_text_encoder: bool | None = None


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2 | sigmoid
    beta_start: float = 0.0001
    beta_end: float = 0.02
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    learned_variance: bool = False  # Improved DDPM: U-Net outputs 2x channels, hybrid loss
    vlb_weight: float = 0.001  # lambda in L_simple + lambda * L_vlb
    snr_gamma: float | None = None  # min-SNR-gamma weighting of L_simple; None = unweighted
    offset_noise: float = 0.0  # adds offset_noise * N(0, 1) per (image, channel) to the noise (Guttenberg 2023)
    # Density of training timesteps: uniform, or logit_normal (t/T = sigmoid(N(mean, std)), as SD3).
    timestep_sampling: str = "uniform"
    timestep_mean: float = 0.0
    timestep_std: float = 1.0


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 64  # global batch per optimizer step, split across processes and accumulation steps
    gradient_accumulation_steps: int = 1
    max_steps: int = 2000
    learning_rate: float = 1e-3
    text_encoder_learning_rate: float | None = None  # None: same as learning_rate
    optimizer: str = "adamw"  # adamw (fused on CUDA) | adamw8bit (needs bitsandbytes)
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # constant | cosine (after warm-up)
    max_grad_norm: float = 1.0  # 0 turns clipping off
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile the U-Net in place (pays on GPUs after a one-off compile)
    mixed_precision: str = "no"  # no | bf16 | fp16 (handed to Accelerate; fp16 uses loss scaling)
    ema_decay: float | None = None  # EMA of the U-Net (diffusers EMAModel); None = off
    ema_warmup: bool = True  # decay ramps up as 1 - (1 + step)^(-2/3) until ema_decay
    log_every: int = 25
    validate_every: int = 0  # validation loss, sample grid and (built-in data) scores; 0: start and end only
    score_num_images: int = 32  # images scored by the built-in scorer at each validation (0: off)
    checkpoint_every: int = 0  # full training state every N steps and at the end; 0: none
    keep_last: int | None = 2  # checkpoints kept (older ones are removed after a new one is complete)
    resume: str | None = None  # "latest" or a checkpoint folder (a missing folder is an error)
    num_workers: int = 0  # data-loading workers when latents are not cached
    tensorboard: bool = True  # also write metrics and grids to <run>/tensorboard


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)  # empty: taken from the data's captions
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    num_inference_steps: int = 50
    guidance_scale: float = 3.0
    scheduler: str = "ddpm"  # ddpm | ddim | dpm++ (a diffusers scheduler made from the training config)


@dataclass
class FinetuneConfig:
    method: str = "full"  # full (every U-Net weight) | lora (low-rank adapters only, through peft)
    lora_rank: int = 4
    lora_alpha: float | None = None  # None: equal to the rank (scale 1)
    lora_dropout: float = 0.0
    lora_feed_forward: bool = False  # attention projections always; also the transformer feed-forwards
    lora_conv: bool = False  # also the ResNet convolutions
    lora_text_encoder: bool = False  # adapters on the text encoder's attention too
    base_dtype: str = "fp32"  # fp32 | bf16 | fp16: the frozen base's dtype (match train.mixed_precision)
    merged_export: bool = False  # also export a full pipeline with the adapters merged at merge_scale
    merge_scale: float = 1.0


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
class LDMConfig:
    name: str = "ldm"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class Raw(str):
    """An override's text, parsed once its field's type is known: ``train.mixed_precision=no`` stays the
    string "no" (YAML alone would read false) and ``train.learning_rate=1e-5`` becomes a float."""


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_value(key: str, value, typ):
    """Return ``value`` if it fits ``typ`` (ints accepted for floats), else raise naming the key."""
    if isinstance(value, Raw):
        if typ is str or (typing.get_origin(typ) in (typing.Union, types.UnionType) and str in typing.get_args(typ)
                          and value.strip() not in ("null", "~", "None")):
            return str(value)
        value = yaml.safe_load(value) if value != "" else ""
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        except ValueError:
            pass
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            try:
                return _check_value(key, value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{key}: {value!r} is not a valid {typ}")
    if typ is type(None):
        if value is None:
            return None
        raise ValueError(f"{key}: expected None, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if typ is int and isinstance(value, bool):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, typ):
        raise ValueError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; "
                         f"valid keys here: {sorted(prefix + k for k in types_)}")
    kwargs = {}
    for key, value in data.items():
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, prefix + key + ".")
        else:
            kwargs[key] = _check_value(prefix + key, value, typ)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.max_steps=100", "sample.seeds=[1,2]"]`` -> nested dict; values parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = Raw(raw)
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Defaults of ``cls`` <- YAML preset at ``path`` <- ``key=value`` overrides."""
    data = dataclasses.asdict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        preset = yaml.safe_load(path.read_text()) or {}
        data = _merge(data, preset)
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def save_config(cfg, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
