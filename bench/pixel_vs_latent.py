"""What a training step costs on pixels against latents, at 32 px (the built-in presets) and at 256 px.

One process, the same machine, each side timed after warm-up steps; ratios are pixel / latent time:

- 32 px: ``configs/ldm/shapes.yaml``'s U-Net on 8x8x8 latents (the shipped VAE) against
  ``configs/ldm/shapes-pixel.yaml``'s on 32x32x3 pixels.
- 256 px: ``configs/ldm/folder-256.yaml``'s U-Net on 32x32x4 latents (a Stable-Diffusion-architecture VAE,
  factor 8) against the same U-Net with three attention-free levels (32, 64, 128 channels) in front that take
  256x256x3 pixels down to 32x32; and the cost of encoding one batch with that VAE, which the latent cache pays
  once per image instead of every step.

Each step is forward, backward and AdamW over the U-Net with a random text context of the preset's size.

    OMP_NUM_THREADS=2 python bench/pixel_vs_latent.py [--batch-32 64 --batch-256 2 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm.engine.config import load_config
from ldm.trainer.config import LDMConfig


def unet_from(preset: str, in_channels: int, size: int, extra_levels: list[int] | None = None):
    cfg = load_config(LDMConfig, preset, [])
    u = cfg.model.unet
    channels, down, up = list(u.block_out_channels), list(u.down_block_types), list(u.up_block_types)
    if extra_levels:
        channels = extra_levels + channels
        down = ["DownBlock2D"] * len(extra_levels) + down
        up = up + ["UpBlock2D"] * len(extra_levels)
    net = UNet2DConditionModel(sample_size=size, in_channels=in_channels, out_channels=in_channels,
                               block_out_channels=channels, down_block_types=down, up_block_types=up,
                               layers_per_block=u.layers_per_block, attention_head_dim=u.attention_head_dim,
                               cross_attention_dim=cfg.model.text_encoder.hidden_size, norm_num_groups=u.norm_num_groups)
    return net, cfg.model.text_encoder


def step_time(net, text, channels: int, size: int, batch: int, steps: int, warmup: int = 1) -> float:
    """Seconds per training step (forward, backward, AdamW) at this batch, after ``warmup`` steps."""
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g)
    context = torch.randn(batch, text.max_length, text.hidden_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        net(x, t, encoder_hidden_states=context).sample.pow(2).mean().backward()
        opt.step(), opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-32", type=int, default=64)
    parser.add_argument("--batch-256", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = {}
    latent, text = unet_from("configs/ldm/shapes.yaml", 8, 8)
    pixel, text_p = unet_from("configs/ldm/shapes-pixel.yaml", 3, 32)
    rows["32px_latent_s_per_step"] = step_time(latent, text, 8, 8, args.batch_32, args.steps)
    rows["32px_pixel_s_per_step"] = step_time(pixel, text_p, 3, 32, args.batch_32, args.steps)
    latent, text = unet_from("configs/ldm/folder-256.yaml", 4, 32)
    pixel, _ = unet_from("configs/ldm/folder-256.yaml", 3, 256, extra_levels=[32, 64, 128])
    rows["256px_latent_s_per_step"] = step_time(latent, text, 4, 32, args.batch_256, args.steps)
    rows["256px_pixel_s_per_step"] = step_time(pixel, text, 3, 256, args.batch_256, args.steps)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).eval()
    images = torch.randn(args.batch_256, 3, 256, 256)
    with torch.no_grad():
        vae.encode(images)
        start = time.perf_counter()
        for _ in range(args.steps):
            vae.encode(images)
    rows["256px_vae_encode_s_per_batch"] = (time.perf_counter() - start) / args.steps
    rows.update(batch_32=args.batch_32, batch_256=args.batch_256, threads=torch.get_num_threads())
    rows["32px_pixel_over_latent"] = rows["32px_pixel_s_per_step"] / rows["32px_latent_s_per_step"]
    rows["256px_pixel_over_latent"] = rows["256px_pixel_s_per_step"] / rows["256px_latent_s_per_step"]
    rows["256px_pixel_over_latent_encoding_every_step"] = rows["256px_pixel_s_per_step"] / (
        rows["256px_latent_s_per_step"] + rows["256px_vae_encode_s_per_batch"])
    for k, v in rows.items():
        print(f"{k:48} {v:.3f}" if isinstance(v, float) else f"{k:48} {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
