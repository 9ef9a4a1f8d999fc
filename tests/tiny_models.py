"""Tiny components shared by tests: an SD-architecture VAE and a Stable Diffusion 1.x pipeline folder."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL


def tiny_vae(path: Path) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16],
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=32,
                        scaling_factor=1.0)
    vae.save_pretrained(path, safe_serialization=True)
    return path


def sd_folder(root: Path, vae_dir: Path, captions: list[str], prediction_type: str = "v_prediction") -> Path:
    """A tiny Stable Diffusion 1.x folder, as StableDiffusionPipeline saves it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ldm.text import build_text_encoder, build_tokenizer

    torch.manual_seed(1)
    tok = build_tokenizer(captions, vocab_size=600, max_length=16)
    te = build_text_encoder(tok, 32, 1, 2, 64)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 32],
                                layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    sched = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type=prediction_type, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=te, tokenizer=tok,
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    return root
