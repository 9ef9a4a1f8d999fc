"""Evaluate a VAE's reconstructions: PSNR, SSIM, a Fréchet distance, latent statistics and a PNG.

    python -m autoencoder.evaluate --vae autoencoder/pretrained/builtin --data shapes --out runs/vae-eval

``--vae`` is ``builtin`` or a diffusers AutoencoderKL folder; ``--data`` a built-in dataset name
(its held-out split is used) or any source ldm.data.load_source reads. Writes ``vae_eval.json`` and
``reconstructions.png`` (originals above reconstructions) into ``--out``.

The Fréchet distance is measured in a fixed feature space defined here: a small convolutional
network whose weights are drawn from a fixed seed (no download), pooled to 96 features per image.
It is comparable between runs of this project, not with published FID numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.errors import user_errors
from ldm.run import atomic_save, make_grid
from ldm.vae import load_vae

from .config import AEDataConfig
from .data import load_images
from .metrics import frechet_distance, latent_stats, psnr, ssim

logger = logging.getLogger(__name__)
FEATURE_SEED = 20240601


class FixedFeatures(torch.nn.Module):
    """Random-weight conv features at three scales (seeded, frozen): (B, 3, H, W) in [0, 1] -> (B, 96)."""

    def __init__(self, seed: int = FEATURE_SEED):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shapes = [(32, 3), (32, 32), (32, 32)]
        self.weights = [torch.randn(o, i, 3, 3, generator=g) * (2.0 / (i * 9)) ** 0.5 for o, i in shapes]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, h = [], x.float() * 2 - 1
        for i, w in enumerate(self.weights):
            h = torch.relu(torch.nn.functional.conv2d(h, w.to(h.device), padding=1, stride=1 if i == 0 else 2))
            feats.append(h.mean(dim=(2, 3)))
        return torch.cat(feats, dim=1)


def feature_stats(features: torch.Tensor):
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


@torch.no_grad()
def reconstruct(vae, loader, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Originals and posterior-mean reconstructions in [0, 1], and the posterior means."""
    originals, recons, latents = [], [], []
    for batch in tqdm(loader, desc="reconstructing", leave=False):
        x = batch["pixel_values"].to(device, vae.dtype)
        z = vae.encode(x).latent_dist.mean
        recons.append(((vae.decode(z).sample.float().clamp(-1, 1) + 1) / 2).cpu())
        originals.append(((x.float() + 1) / 2).cpu())
        latents.append(z.float().cpu())
    return torch.cat(originals), torch.cat(recons), torch.cat(latents)


def reconstruction_grid(originals: torch.Tensor, recons: torch.Tensor, n: int = 16) -> Image.Image:
    """The first ``n`` originals (top row) above their reconstructions; tensors in [0, 1]."""
    n = min(n, len(originals))
    return make_grid([Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                      for t in torch.cat([originals[:n], recons[:n]])], ncols=n)


def reconstruction_metrics(originals: torch.Tensor, recons: torch.Tensor) -> dict:
    """Mean PSNR and SSIM, and the Fréchet distance of reconstructions to originals in FixedFeatures."""
    net = FixedFeatures()
    fd = frechet_distance(*feature_stats(net(originals)), *feature_stats(net(recons)))
    return {"psnr_db": float(psnr(originals, recons).mean()), "ssim": float(ssim(originals, recons).mean()),
            "frechet_distance": fd, "num_images": len(originals)}


def evaluate(vae_spec: str, data: str, out: str | None = None, resolution: int = 32, num_images: int = 1024,
             batch_size: int = 64, data_root: str = "data") -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_vae(vae_spec).to(device).eval()
    images = load_images(data, AEDataConfig(datasets=[data], data_root=data_root, resolution=resolution), "heldout")
    images = torch.utils.data.Subset(images, range(min(num_images, len(images))))
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size)
    originals, recons, latents = reconstruct(vae, loader, device)
    scale = float(vae.config.scaling_factor)
    result = {"vae": str(vae_spec), "data": str(data), **reconstruction_metrics(originals, recons),
              "latents": latent_stats(latents), "scaled_latent_std": float(latents.std() * scale),
              "scaling_factor": scale}
    if out:
        out_dir = Path(out)
        grid = reconstruction_grid(originals, recons)
        atomic_save(lambda p: grid.save(p, format="PNG"), out_dir / "reconstructions.png")
        atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out_dir / "vae_eval.json")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default="builtin", help="'builtin' or an AutoencoderKL folder")
    parser.add_argument("--data", required=True, help="built-in dataset name, image folder, parquet, ...")
    parser.add_argument("--out", default=None)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        logging.basicConfig(level=logging.INFO)
        result = evaluate(args.vae, args.data, args.out, args.resolution, args.num_images)
        print(json.dumps({k: v for k, v in result.items() if k != "latents"}, indent=2))


if __name__ == "__main__":
    main()
