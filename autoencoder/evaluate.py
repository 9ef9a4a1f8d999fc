"""Evaluate a VAE's reconstructions: PSNR, SSIM, a Fréchet distance, latent statistics and a PNG.

    python -m autoencoder.evaluate --vae builtin --out runs/vae-eval                # the held-out suite
    python -m autoencoder.evaluate --vae autoencoder/pretrained/builtin --data shapes --out runs/vae-eval

``--vae`` is ``builtin`` or a diffusers AutoencoderKL folder. ``--data`` is a built-in dataset name
(its held-out split is used) or any source ldm.data.load_source reads. Without ``--data`` the VAE is
measured on the held-out suite (`SUITE_FLOORS`): the built-in shapes and digits, and images drawn
independently of any training split (shapes of any colour on black, grey and white, stars and polygons,
crops of photographs it never saw), each against its PSNR floor. Writes ``vae_eval.json`` and
``reconstructions.png`` (originals above reconstructions) into ``--out``.

The Fréchet distance is measured in `ldm.eval.metrics.FixedFeatures`: a small convolutional network whose
weights are drawn from a fixed seed (no download), pooled to 96 features per image. It is comparable
between runs of this project, not with published FID numbers.
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

from autoencoder.config import AEDataConfig
from autoencoder.data import load_images
from autoencoder.metrics import latent_stats
from ldm.engine.errors import user_errors
from ldm.engine.records import make_grid
from ldm.eval.metrics import FixedFeatures, feature_stats, frechet_distance, psnr, ssim, to_tensor
from ldm.models.vae import load_vae
from pipelines.files import atomic_save

logger = logging.getLogger(__name__)
# PSNR (dB) a general-purpose VAE for this project should reach on each held-out set of the suite.
SUITE_FLOORS = {"shapes": 30.0, "digits": 30.0, "shapes on black": 25.0, "shapes on grey": 25.0,
                "shapes on white": 25.0, "stars and polygons": 25.0, "photo crops": 25.0}


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
    return make_grid([_to_pil(t) for t in torch.cat([originals[:n], recons[:n]])], ncols=n)


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


def suite_images(num_images: int = 128, resolution: int = 32, data_root: str = "data",
                 seed: int | None = None) -> dict[str, torch.Tensor]:
    """The held-out suite as (n, 3, H, W) tensors in [-1, 1]: the built-in held-out splits of shapes and digits,
    then `ldm.data.builtin_images.generalisation_sets` (drawn from ``seed``, by default its own)."""
    from ldm.data.builtin_images import HELDOUT_SEED, generalisation_sets

    sets = {}
    for name in ("shapes", "digits"):
        ds = load_images(name, AEDataConfig(datasets=[name], data_root=data_root, resolution=resolution), "heldout")
        sets[name] = torch.stack([ds[i]["pixel_values"] for i in range(min(num_images, len(ds)))])
    drawn = generalisation_sets(num_images, HELDOUT_SEED if seed is None else seed, resolution)
    for name, images in drawn.items():
        sets[name] = to_tensor(images) * 2 - 1
    return sets


def evaluate_suite(vae_spec: str, out: str | None = None, resolution: int = 32, num_images: int = 128,
                   data_root: str = "data", seed: int | None = None) -> dict:
    """PSNR, SSIM and Fréchet distance of ``vae_spec`` on every set of `suite_images`, each with its floor."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_vae(vae_spec).to(device).eval()
    sets, originals, recons = {}, [], []
    for name, x in suite_images(num_images, resolution, data_root, seed).items():
        o, r, _ = reconstruct(vae, torch.utils.data.DataLoader(x, batch_size=64, collate_fn=_as_batch), device)
        m = reconstruction_metrics(o, r)
        sets[name] = {**m, "floor_psnr_db": SUITE_FLOORS[name], "meets_floor": m["psnr_db"] >= SUITE_FLOORS[name]}
        originals.append(o[:8])
        recons.append(r[:8])
    result = {"vae": str(vae_spec), "sets": sets, "all_meet_floors": all(s["meets_floor"] for s in sets.values()),
              "scaling_factor": float(vae.config.scaling_factor)}
    if out:
        out_dir = Path(out)
        # one row pair per set: 8 originals, then their reconstructions
        grid = make_grid([_to_pil(t) for o, r in zip(originals, recons) for t in torch.cat([o, r])], ncols=8)
        atomic_save(lambda p: grid.save(p, format="PNG"), out_dir / "reconstructions.png")
        atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out_dir / "vae_eval.json")
    return result


def _as_batch(items: list[torch.Tensor]) -> dict:
    return {"pixel_values": torch.stack(items)}


def _to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default="builtin", help="'builtin' or an AutoencoderKL folder")
    parser.add_argument("--data", default=None,
                        help="built-in dataset name, image folder, parquet, ...; without it, the held-out suite")
    parser.add_argument("--out", default=None)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=None,
                        help="images per set (default 1024 with --data, 128 per set of the suite)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        logging.basicConfig(level=logging.INFO)
        if args.data is None:
            result = evaluate_suite(args.vae, args.out, args.resolution, args.num_images or 128)
            print(f"{'set':<20} {'PSNR dB':>8} {'floor':>6} {'SSIM':>6}")
            for name, m in result["sets"].items():
                print(f"{name:<20} {m['psnr_db']:8.2f} {m['floor_psnr_db']:6.1f} {m['ssim']:6.3f}"
                      f"{'' if m['meets_floor'] else '  below floor'}")
            return
        result = evaluate(args.vae, args.data, args.out, args.resolution, args.num_images or 1024)
        print(json.dumps({k: v for k, v in result.items() if k != "latents"}, indent=2))


if __name__ == "__main__":
    main()
