"""Score a trained pipeline on a built-in dataset's evaluation prompts.

    python -m ldm.evaluate --pipeline runs/demo/pipeline --dataset shapes --num-images 96 --out runs/demo

For ``shapes`` the prompts are the (colour, shape, position) combinations held out of training; for
``digits`` the ten digits. Seeds start at ``--seed-offset`` (far from any seed the trainer uses).
Writes ``samples.png`` (one row per prompt) and ``metrics.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import user_errors
from .builtin_data import BUILTIN_DATASETS, eval_prompts, score
from .run import atomic_save, make_grid
from .schedulers import SAMPLERS, sampling_scheduler

logger = logging.getLogger(__name__)


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


def evaluate(pipeline: str, dataset: str, num_images: int = 96, out: str | None = None,
             num_inference_steps: int = 50, guidance_scale: float = 3.0, scheduler: str = "ddpm",
             seed_offset: int = 100_000, batch_size: int = 48) -> dict:
    from pipelines import LDMPipeline

    if dataset not in BUILTIN_DATASETS:
        raise ValueError(f"--dataset must be a built-in dataset {BUILTIN_DATASETS}, got {dataset!r}")
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
                                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    result = {"dataset": dataset, "pipeline": str(pipeline), **score(dataset, images, prompts),
              "prompts": base, "images_per_prompt": per_prompt, "seeds": [seed_offset, seed_offset + len(prompts) - 1],
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "scheduler": scheduler, "sampling_time_s": round(time.time() - t0, 1)}
    if out:
        out_dir = Path(out)
        grid = make_grid(images, ncols=per_prompt)
        atomic_save(lambda p: grid.save(p, format="PNG"), out_dir / "samples.png")
        atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out_dir / "metrics.json")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a pipeline folder (runs/<name>/pipeline)")
    parser.add_argument("--dataset", required=True, choices=BUILTIN_DATASETS)
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--out", default=None, help="folder for samples.png and metrics.json")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--scheduler", default="ddpm", choices=list(SAMPLERS))
    parser.add_argument("--seed-offset", type=int, default=100_000)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        logging.basicConfig(level=logging.INFO)
        result = evaluate(args.pipeline, args.dataset, args.num_images, args.out, args.steps, args.guidance_scale,
                          args.scheduler, args.seed_offset)
        keys = [k for k in result if k.endswith("_accuracy")] + ["num_images", "sampling_time_s"]
        print(json.dumps({k: result[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
