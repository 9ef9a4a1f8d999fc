"""A scored cascade: the demo's 32 px text-to-image model, then a super-resolution stage to 128 px, with and
without conditioning augmentation.

    python -m demos.cascade_demo --base runs/demo/pipeline --out runs/cascade-demo

1. Train two super-resolution stages with ``configs/ldm/shapes-sr.yaml`` on built-in ``shapes`` drawn at
   128 px, the same budget and seed: one with conditioning augmentation (noise levels uniform over the config's
   range), one without (levels [0, 0]).
2. Draw the base model's samples of the held-out prompts once (as ``make demo`` scores them), and upscale the
   same samples with both stages at the augmentation levels ``--levels`` (steps of the 1000-step
   low-resolution schedule: 0, 100, 250, 500 = 0, 0.1, 0.25, 0.5 of it).
3. Score every set at 128 px: colour / shape / position read off the pixels, Fréchet distance to real 128 px
   images of the same prompts (and its real-vs-real floor), diversity; and each stage alone on real 32 px
   inputs (area-downsampled real 128 px images): PSNR and SSIM against the real 128 px image, beside bicubic
   upsampling.

Writes ``results.json``, ``grid.png`` (rows: prompts; columns: base 32 px | SR without augmentation | SR with
augmentation, at ``--grid-level``) and the augmented cascade as one folder, ``cascade/``, sampling at
``--cascade-level``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from PIL import Image

from ldm.engine.errors import user_errors
from ldm.engine.records import make_grid
from ldm.eval.metrics import psnr, ssim, to_tensor
from ldm.eval.scorers import eval_prompts, real_images, score
from ldm.eval.scoring import distribution_scores, generate_for_prompts
from pipelines.files import atomic_save

logger = logging.getLogger(__name__)

SEED_OFFSET = 100_000  # as `ldm.evaluate`: the base samples are those `make demo` scores
REAL_SEED = 11  # the real 128 px images the stages upscale from their 32 px versions
LEVELS = (0, 100, 250, 500)


def upscale_all(pipe, images: list, prompts: list[str], level: int, steps: int, batch_size: int = 48) -> list:
    """Each image upscaled under its prompt at augmentation ``level``, image i with generator seed
    SEED_OFFSET + i (the same noise for every stage and level)."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=f"upscaling (level {level})"):
        gens = [torch.Generator().manual_seed(SEED_OFFSET + j) for j in range(i, min(i + batch_size, len(images)))]
        out += pipe(prompts[i:i + batch_size], image=images[i:i + batch_size], noise_level=level, generator=gens,
                    num_inference_steps=steps, guidance_scale=1.0).images
    return out


def scores(images: list, prompts: list[str]) -> dict:
    s = score("shapes", images, prompts)
    return {**{k: v for k, v in s.items() if k.endswith("_accuracy")}, **distribution_scores("shapes", images, prompts)}


def reconstruction(pipe, captions: list[str], level: int, steps: int) -> dict:
    """The stage alone on real 32 px inputs: PSNR / SSIM of its 128 px output against the real image."""
    real = to_tensor(real_images("shapes", captions, REAL_SEED, resolution=128))
    low = torch.nn.functional.avg_pool2d(real, 4)
    out = to_tensor(upscale_all(pipe, low, captions, level, steps))
    return {"psnr_db": float(psnr(out, real).mean()), "ssim": float(ssim(out, real).mean())}


def bicubic(captions: list[str]) -> dict:
    real = to_tensor(real_images("shapes", captions, REAL_SEED, resolution=128))
    low = torch.nn.functional.avg_pool2d(real, 4)
    up = torch.nn.functional.interpolate(low, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    return {"psnr_db": float(psnr(up, real).mean()), "ssim": float(ssim(up, real).mean())}


def train_stage(config: str, out: Path, name: str, overrides: list[str], reuse: bool = False) -> Path:
    """Train a stage into ``out/name`` (again, unless ``reuse`` and its pipeline is there); its pipeline folder."""
    from ldm.engine.config import load_config
    from ldm.trainer.config import LDMConfig
    from ldm.trainer.train import train

    cfg = load_config(LDMConfig, config, [f"output_dir={out}", f"name={name}", "train.overwrite=true", *overrides])
    if reuse and (cfg.run_dir / "pipeline" / "model_index.json").is_file():
        logger.info("--reuse: scoring the stage already trained in %s", cfg.run_dir)
    else:
        train(cfg)
    return cfg.run_dir / "pipeline"


def run(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pipelines import CascadePipeline, LDMPipeline, SuperResolutionPipeline

    out = Path(args.out)
    if not (Path(args.base) / "model_index.json").is_file():
        raise FileNotFoundError(f"--base {args.base!r} is not a pipeline folder; run `make demo` first")
    t0 = time.time()
    stages = {"no_aug": train_stage(args.config, out, "sr-no-aug", ["super_resolution.noise_levels=[0,0]",
                                                                    *args.overrides], args.reuse),
              "aug": train_stage(args.config, out, "sr-aug", list(args.overrides), args.reuse)}
    train_s = time.time() - t0
    pipes = {k: SuperResolutionPipeline.from_pretrained(v) for k, v in stages.items()}

    base = LDMPipeline.from_pretrained(args.base)
    prompts, low = generate_for_prompts(base, eval_prompts("shapes"), args.per_prompt, SEED_OFFSET,
                                        num_inference_steps=args.base_steps, guidance_scale=args.guidance_scale)
    result = {"base": args.base, "stages": {k: str(v) for k, v in stages.items()},
              "levels": list(args.levels), "level_fraction_of_schedule": [lv / 1000 for lv in args.levels],
              "num_images": len(prompts), "sr_steps": args.sr_steps, "base_steps": args.base_steps,
              "base_guidance_scale": args.guidance_scale, "base_32px": scores(low, prompts)}
    upscaled = {}
    for name, pipe in pipes.items():
        result[name] = {}
        for level in args.levels:
            images = upscale_all(pipe, low, prompts, level, args.sr_steps)
            upscaled[name, level] = images
            result[name][str(level)] = {**scores(images, prompts), "real_inputs": reconstruction(
                pipe, prompts[:args.real_images], level, args.sr_steps)}
    result["bicubic_real_inputs"] = bicubic(prompts[:args.real_images])
    result["time_s"] = {"training_both_stages": round(train_s, 1), "total": round(time.time() - t0, 1)}

    # grid: one row per prompt (its first image), base | without | with augmentation at --grid-level
    level = args.grid_level if args.grid_level in args.levels else args.levels[0]
    cells = []
    for i in range(0, len(prompts), args.per_prompt):
        cells += [low[i].resize((128, 128), Image.Resampling.NEAREST), upscaled["no_aug", level][i],
                  upscaled["aug", level][i]]
    grid = make_grid(cells, ncols=3)
    atomic_save(lambda p: grid.save(p, format="PNG"), out / "grid.png")
    cascade = CascadePipeline(base, [pipes["aug"]], [{"noise_level": args.cascade_level,
                                                       "num_inference_steps": args.sr_steps, "guidance_scale": 1.0}])
    cascade.save_pretrained(out / "cascade")
    result["cascade"], result["cascade_level"] = str(out / "cascade"), args.cascade_level
    atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out / "results.json")
    print_table(result)
    print(f"wrote {out / 'results.json'}, {out / 'grid.png'} and the cascade {out / 'cascade'} at level "
          f"{args.cascade_level} "
          f"({result['time_s']['total']:.0f} s)")
    return result


def print_table(result: dict) -> None:
    b = result["base_32px"]
    print(f"base 32 px: colour {b['colour_accuracy']:.3f}  shape {b['shape_accuracy']:.3f}  "
          f"position {b['position_accuracy']:.3f}  FD {b['frechet_distance']:.4f} (floor {b['frechet_distance_floor']:.4f})")
    print(f"{'stage':<8}{'level':>6}{'colour':>8}{'shape':>8}{'pos':>8}{'FD':>9}{'floor':>8}{'PSNR':>8}{'SSIM':>7}")
    for name in ("no_aug", "aug"):
        for level, r in result[name].items():
            print(f"{name:<8}{level:>6}{r['colour_accuracy']:>8.3f}{r['shape_accuracy']:>8.3f}"
                  f"{r['position_accuracy']:>8.3f}{r['frechet_distance']:>9.4f}{r['frechet_distance_floor']:>8.4f}"
                  f"{r['real_inputs']['psnr_db']:>8.2f}{r['real_inputs']['ssim']:>7.3f}")
    c = result["bicubic_real_inputs"]
    print(f"bicubic upsampling of the real 32 px inputs: PSNR {c['psnr_db']:.2f} dB, SSIM {c['ssim']:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the 32 px text-to-image pipeline (runs/demo/pipeline)")
    parser.add_argument("--out", default="runs/cascade-demo")
    parser.add_argument("--config", default="configs/ldm/shapes-sr.yaml")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS),
                        help="augmentation levels at sampling (steps of the 1000-step low-resolution schedule)")
    parser.add_argument("--grid-level", type=int, default=100, help="the augmentation level the grid shows")
    parser.add_argument("--cascade-level", type=int, default=0,
                        help="the augmentation level the saved cascade samples at (on this data level 0 gives the "
                             "best shape accuracy: docs/results.md)")
    parser.add_argument("--per-prompt", type=int, default=6, help="base samples per held-out prompt")
    parser.add_argument("--real-images", type=int, default=32, help="real 32 px inputs for PSNR / SSIM")
    parser.add_argument("--base-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=1.5, help="the base's, as `make demo` scores it")
    parser.add_argument("--sr-steps", type=int, default=10, help="the stages' sampling steps (DPM++)")
    parser.add_argument("--reuse", action="store_true", help="score stages already trained under --out again")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the super-resolution config")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        run(args)


if __name__ == "__main__":
    main()
