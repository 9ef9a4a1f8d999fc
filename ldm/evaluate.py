"""Score a trained pipeline on a built-in dataset's evaluation prompts.

    python -m ldm.evaluate --pipeline runs/demo/pipeline --dataset shapes --num-images 96 --out runs/demo

For ``shapes`` the prompts are the (colour, shape, position) combinations held out of training; for
``digits`` the ten digits. Seeds start at ``--seed-offset`` (far from any seed the trainer uses).
Writes ``samples.png`` (one row per prompt) and ``metrics.json`` into ``--out``.

Beyond the scorer's accuracies (and, for shapes, the position confusion matrix), two measures that see
what accuracy cannot, both against real images of the same prompts (`ldm.builtin_data.real_images`):

- ``frechet_distance``: generated images against a reference of `REFERENCE_PER_PROMPT` real images per
  prompt, in `ldm.metrics.FixedFeatures` with layout. ``frechet_distance_floor`` is the same distance for
  as many other real images as were generated: what a perfect model would score at this sample size.
- ``diversity``: the mean pairwise RMS pixel distance of the images of one prompt, averaged over prompts;
  ``diversity_real`` is the same for the real images. A model that draws one image per prompt scores 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .builtin_data import SCORED_DATASETS, eval_prompts, real_images, score
from .errors import user_errors
from .metrics import diversity, image_frechet_distance, to_tensor
from .run import atomic_save, make_grid
from .schedulers import SAMPLERS, sampling_scheduler

logger = logging.getLogger(__name__)
REFERENCE_PER_PROMPT = 32
REFERENCE_SEED, FLOOR_SEED = 7, 8  # real images: the reference set, and the sample that gives the floor


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], batch_size: int = 48, **kwargs) -> list:
    """One image per (prompt, seed) pair, in order, each from its own seeded generator."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling"):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        gens = [torch.Generator().manual_seed(seed) for seed in s]
        images += pipe(p, generator=gens, **kwargs).images
    return images


def generate_for_prompts(pipe, base_prompts: list[str], per_prompt: int, seed_offset: int = 100_000,
                         batch_size: int = 48, **kwargs) -> tuple[list[str], list]:
    """``per_prompt`` images of each prompt (seeds ``seed_offset``, +1, ...): (prompts as drawn, images)."""
    prompts = [p for p in base_prompts for _ in range(per_prompt)]
    return prompts, generate(pipe, prompts, [seed_offset + i for i in range(len(prompts))], batch_size, **kwargs)


def distribution_scores(dataset: str, images: list, prompts: list[str]) -> dict:
    """Fréchet distance to real images of the same prompts (and its real-vs-real floor), and diversity per
    prompt (and the real images'), as the module's docstring says."""
    base = list(dict.fromkeys(prompts))
    reference = to_tensor(real_images(dataset, [p for p in base for _ in range(REFERENCE_PER_PROMPT)],
                                      REFERENCE_SEED, "heldout"))
    real = to_tensor(real_images(dataset, prompts, FLOOR_SEED, "train"))
    generated = to_tensor(images)
    return {"frechet_distance": image_frechet_distance(generated, reference),
            "frechet_distance_floor": image_frechet_distance(real, reference),
            "diversity": diversity(generated, prompts), "diversity_real": diversity(real, prompts)}


def evaluate(pipeline: str, dataset: str, num_images: int = 96, out: str | None = None,
             num_inference_steps: int = 50, guidance_scale: float = 3.0, scheduler: str = "ddpm",
             seed_offset: int = 100_000, batch_size: int = 48, guidance_rescale: float = 0.0) -> dict:
    from pipelines import LDMPipeline

    if dataset not in SCORED_DATASETS:
        raise ValueError(f"--dataset must be a scored built-in dataset {SCORED_DATASETS}, got {dataset!r}")
    if num_images < 1:
        raise ValueError(f"--num-images must be positive, got {num_images}")
    pipe = LDMPipeline.from_pretrained(pipeline)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    pipe.scheduler = sampling_scheduler(pipe.scheduler, scheduler)
    base = eval_prompts(dataset)
    per_prompt = -(-num_images // len(base))  # ceil: every prompt gets the same number of images
    t0 = time.time()
    prompts, images = generate_for_prompts(pipe, base, per_prompt, seed_offset, batch_size,
                                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                           guidance_rescale=guidance_rescale)
    result = {"dataset": dataset, "pipeline": str(pipeline), **score(dataset, images, prompts),
              **distribution_scores(dataset, images, prompts),
              "prompts": base, "images_per_prompt": per_prompt, "seeds": [seed_offset, seed_offset + len(prompts) - 1],
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "guidance_rescale": guidance_rescale, "scheduler": scheduler, "sampling_time_s": round(time.time() - t0, 1)}
    if out:
        out_dir = Path(out)
        grid = make_grid(images, ncols=per_prompt)
        atomic_save(lambda p: grid.save(p, format="PNG"), out_dir / "samples.png")
        atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out_dir / "metrics.json")
    return result


def format_confusion(conf: dict) -> str:
    """The position confusion matrix as a text table: one row per wanted position."""
    width = max(len(c) for c in conf["columns"] + conf["rows"]) + 1
    lines = ["wanted \\ drawn".ljust(width) + "".join(c.rjust(width) for c in conf["columns"])]
    lines += [r.ljust(width) + "".join(str(v).rjust(width) for v in row) for r, row in zip(conf["rows"], conf["matrix"])]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a pipeline folder (runs/<name>/pipeline)")
    parser.add_argument("--dataset", required=True, choices=SCORED_DATASETS)
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--out", default=None, help="folder for samples.png and metrics.json")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="rescale guided outputs towards the conditional one's std (0 off; 0.7 in Lin et al.)")
    parser.add_argument("--scheduler", default="ddpm", choices=list(SAMPLERS))
    parser.add_argument("--seed-offset", type=int, default=100_000)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        logging.basicConfig(level=logging.INFO)
        result = evaluate(args.pipeline, args.dataset, args.num_images, args.out, args.steps, args.guidance_scale,
                          args.scheduler, args.seed_offset, guidance_rescale=args.guidance_rescale)
        keys = [k for k in result if k.endswith("_accuracy")] + [
            "frechet_distance", "frechet_distance_floor", "diversity", "diversity_real", "num_images",
            "sampling_time_s"]
        print(json.dumps({k: round(result[k], 4) if isinstance(result[k], float) else result[k] for k in keys},
                         indent=2))
        if "position_confusion" in result:
            print(format_confusion(result["position_confusion"]))


if __name__ == "__main__":
    main()
