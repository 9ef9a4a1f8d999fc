"""Typed defaults for training a KL autoencoder (the first, frozen stage of a latent diffusion model)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from ldm.engine.config import Checker, EngineSettings, RunConfig, check_engine_settings
from pipelines.latents import vae_scale_factor

TrainPart = typing.Literal["both", "decoder"]
DiscLoss = typing.Literal["hinge", "vanilla"]


@dataclass
class AEDataConfig:
    datasets: list[str] = field(default_factory=lambda: ["shapes", "digits"])  # built-in names or folders
    data_root: str = "data"
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 32
    center_crop: bool = True
    alpha_background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB under transparent pixels
    max_bad_fraction: float = 0.01  # images that cannot be decoded are skipped; more than this is an error


@dataclass
class AEModelConfig:
    # len(block_out_channels) - 1 downsamplings: [32, 64, 64] compresses 32 px to 8x8 latents.
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 32
    # Fine-tune an existing diffusers AutoencoderKL folder (e.g. an SD VAE on disk) instead of building one.
    pretrained: str | None = None
    train_part: TrainPart = "both"  # decoder: the encoder, hence the latent space, stays bit-identical


@dataclass
class AETrainConfig(EngineSettings):
    """The engine's settings (`EngineSettings`) with the autoencoder's defaults, and its losses."""

    batch_size: int = 32
    max_steps: int = 3000
    weight_decay: float = 0.0
    log_every: int = 50
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-6
    scale_num_images: int = 2048  # images encoded to measure the latent scaling factor
    measure_shift: bool = False  # also store the latent mean as shift_factor (z = (z - shift) * scale)
    perceptual_weight: float = 0.0  # LPIPS term; needs lpips_path (a local file, nothing is downloaded)
    lpips_path: str | None = None
    # PatchGAN discriminator (off while disc_weight is 0), switched on from step disc_start; its term's
    # weight is disc_weight times the adaptive ratio of gradient norms at the decoder's last layer.
    disc_weight: float = 0.0
    disc_start: int = 1000
    disc_loss: DiscLoss = "hinge"  # vanilla: non-saturating
    disc_learning_rate: float | None = None  # None: same as learning_rate
    disc_channels: int = 64
    disc_layers: int = 3


@dataclass
class AutoencoderConfig(RunConfig):
    name: str = "vae"
    export_dir: str | None = None  # also copy the final VAE folder here (e.g. the shipped location)
    data: AEDataConfig = field(default_factory=AEDataConfig)
    model: AEModelConfig = field(default_factory=AEModelConfig)
    train: AETrainConfig = field(default_factory=AETrainConfig)

    RUN_SETTINGS = RunConfig.RUN_SETTINGS + ("export_dir", "data.data_root", "model.pretrained")


def check_config(cfg: AutoencoderConfig, num_processes: int = 1, strategy: str = "no") -> None:
    """Reject bad values of an autoencoder run before any data is read or model built."""
    c = Checker(cfg)
    check_engine_settings(c)
    tc, m = cfg.train, cfg.model
    if strategy in ("fsdp", "deepspeed"):
        raise ValueError(f"the {strategy} strategy is not supported by the autoencoder trainer, whose latent scale, "
                         f"held-out metrics and export run on the main process with the whole VAE (small enough for "
                         f"one GPU); use DDP (configs/accelerate/ddp.yaml)")
    c.require(tc.batch_size % num_processes == 0, "train.batch_size",
              f"must divide by the number of processes ({num_processes})")
    c.require(len(cfg.data.datasets) > 0 and all(cfg.data.datasets), "data.datasets", "needs at least one source")
    c.at_least("data.resolution", 1)
    c.require(len(m.block_out_channels) >= 1 and all(ch >= 1 for ch in m.block_out_channels),
              "model.block_out_channels", "needs one positive channel count per level")
    c.require(all(ch % m.norm_num_groups == 0 for ch in m.block_out_channels) if m.norm_num_groups >= 1 else False,
              "model.norm_num_groups", f"must be >= 1 and divide every channel count {m.block_out_channels}")
    factor = vae_scale_factor(m)
    c.require(cfg.data.resolution % factor == 0 or m.pretrained is not None, "data.resolution",
              f"must be a multiple of the VAE's factor {factor}")
    c.at_least("model.latent_channels", 1)
    c.at_least("model.layers_per_block", 1)
    c.require(m.train_part == "both" or m.pretrained is not None, "model.train_part",
              "'decoder' needs model.pretrained (an encoder to keep)")
    for key in ("l1_weight", "l2_weight", "kl_weight", "perceptual_weight", "disc_weight", "disc_start"):
        c.at_least(f"train.{key}", 0)
    c.require(tc.l1_weight + tc.l2_weight + tc.perceptual_weight > 0, "train.l1_weight",
              "l1_weight, l2_weight and perceptual_weight cannot all be 0: nothing would teach reconstruction")
    c.require(tc.perceptual_weight == 0 or bool(tc.lpips_path), "train.lpips_path",
              "train.perceptual_weight > 0 needs the LPIPS weights as a local safetensors file")
    c.positive("train.disc_learning_rate", optional=True)
    c.at_least("train.disc_channels", 1)
    c.at_least("train.disc_layers", 1)
    c.at_least("train.scale_num_images", 1)
