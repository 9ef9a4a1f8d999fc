"""Score a trained pipeline on a built-in dataset's evaluation prompts (`python -m ldm.evaluate`).

For ``shapes`` the prompts are the (colour, shape, position) combinations held out of training; for
``digits`` the ten digits. Seeds start at ``seed_offset`` (far from any seed the trainer uses).

Beyond the scorer's accuracies (and, for shapes, the position confusion matrix), two measures that see
what accuracy cannot, both against real images of the same prompts (`ldm.eval.scorers.real_images`):

- ``frechet_distance``: generated images against a reference of `REFERENCE_PER_PROMPT` real images per
  prompt, in `ldm.eval.metrics.FixedFeatures` with layout. ``frechet_distance_floor`` is the same distance for
  as many other real images as were generated: what a perfect model would score at this sample size.
- ``diversity``: the mean pairwise RMS pixel distance of the images of one prompt, averaged over prompts;
  ``diversity_real`` is the same for the real images. A model that draws one image per prompt scores 0."""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.diffusion.schedulers import sampling_scheduler, with_variance
from ldm.engine.errors import check_stop
from ldm.engine.records import make_grid
from ldm.eval.metrics import (
    FixedFeatures,
    diversity,
    feature_stats,
    frechet_distance,
    image_frechet_distance,
    to_tensor,
)
from ldm.eval.scorers import SCORED_DATASETS, eval_prompts, real_images, score, score_each
from pipelines.files import atomic_save

logger = logging.getLogger(__name__)
REFERENCE_PER_PROMPT = 32
REFERENCE_SEED, FLOOR_SEED = 7, 8  # real images: the reference set, and the sample that gives the floor


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], batch_size: int = 48, **kwargs) -> list:
    """One image per (prompt, seed) pair, in order, each from its own seeded generator."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling"):
        check_stop("sampling")
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
    prompt (and the real images'), as the module's docstring says; real images at the generated images' size."""
    base = list(dict.fromkeys(prompts))
    res = images[0].size[0]
    reference = to_tensor(real_images(dataset, [p for p in base for _ in range(REFERENCE_PER_PROMPT)],
                                      REFERENCE_SEED, "heldout", res))
    real = to_tensor(real_images(dataset, prompts, FLOOR_SEED, "train", res))
    generated = to_tensor(images)
    return {"frechet_distance": image_frechet_distance(generated, reference),
            "frechet_distance_floor": image_frechet_distance(real, reference),
            "diversity": diversity(generated, prompts), "diversity_real": diversity(real, prompts)}


@torch.no_grad()
def _resampled(dataset: str, image_sets: list[list], prompts: list[str], resamples: int, seed: int):
    """Each image set's scores (accuracies, Fréchet distance) on its full sample and on ``resamples`` bootstrap
    resamples, every set resampled at the same indices (with replacement, within each prompt, so every prompt
    keeps its share): (full, draws), a list per set of {metric: value} and {metric: [value per resample]}."""
    if resamples < 2:
        raise ValueError(f"bootstrap resamples must be at least 2, got {resamples}")
    import numpy as np

    base = list(dict.fromkeys(prompts))
    net = FixedFeatures(layout=True)
    reference = to_tensor(real_images(dataset, [p for p in base for _ in range(REFERENCE_PER_PROMPT)],
                                      REFERENCE_SEED, "heldout", image_sets[0][0].size[0]))
    ref_stats = feature_stats(net(reference))
    hits = [score_each(dataset, images, prompts) for images in image_sets]
    features = [net(to_tensor(images)) for images in image_sets]
    full = [{**{k: float(v.mean()) for k, v in h.items()},
             "frechet_distance": frechet_distance(*feature_stats(f), *ref_stats)} for h, f in zip(hits, features)]
    groups = [np.flatnonzero(np.array(prompts) == p) for p in base]
    rng = np.random.default_rng(seed)
    draws = [{k: [] for k in full[0]} for _ in image_sets]
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(g, size=len(g)) for g in groups])
        for h, f, d in zip(hits, features, draws):
            for k, v in h.items():
                d[k].append(float(v[idx].mean()))
            d["frechet_distance"].append(frechet_distance(*feature_stats(f[torch.from_numpy(idx)]), *ref_stats))
    return full, draws


def bootstrap_bands(dataset: str, images: list, prompts: list[str], resamples: int = 200, seed: int = 0) -> dict:
    """How far each accuracy and the Fréchet distance move when the same number of images is drawn again:
    ``resamples`` bootstrap resamples of the images (with replacement, within each prompt, so every prompt keeps
    its share), each scored against the same real reference. {metric: {"std", "low", "high"}}: the 95 % band of
    a cell scored on this many images. For an accuracy (a mean) low and high are the 2.5 and 97.5 percentiles of
    the resamples; for the Fréchet distance, the full sample's distance ± 1.96 std: a resample repeats about a
    third of its images, which raises the distance of every resample (a 96-image cell at 0.050 resampled to
    0.058-0.093), so its percentiles would miss the distance they are about."""
    import numpy as np

    (full,), (draws,) = _resampled(dataset, [images], prompts, resamples, seed)
    bands = {k: {"std": float(np.std(v)), "low": float(np.percentile(v, 2.5)), "high": float(np.percentile(v, 97.5))}
             for k, v in draws.items()}
    fd, std = full["frechet_distance"], bands["frechet_distance"]["std"]
    bands["frechet_distance"].update(low=max(fd - 1.96 * std, 0.0), high=fd + 1.96 * std)
    return bands


def paired_bands(dataset: str, images_a: list, images_b: list, prompts: list[str], resamples: int = 200,
                 seed: int = 0) -> dict:
    """How much B scores above A, with a 95 % band, for two image sets drawn for the same prompts from the same
    seeds (two models, one sampler): both are resampled at the same indices, so the noise the two share (which
    starting noises happened to be drawn) cancels in the difference and what is left is the models' own.
    {metric: {"difference", "std", "low", "high"}}: the difference ± 1.96 std of the resampled differences (the
    bootstrap's upward bias on a distance is about the same for both and cancels too); a band that holds 0 does
    not tell the two apart."""
    import numpy as np

    if not len(images_a) == len(images_b) == len(prompts):
        raise ValueError(f"paired image sets must be the same prompts' images: got {len(images_a)} and "
                         f"{len(images_b)} images for {len(prompts)} prompts")
    (full_a, full_b), (draws_a, draws_b) = _resampled(dataset, [images_a, images_b], prompts, resamples, seed)
    bands = {}
    for k in full_a:
        diff, std = full_b[k] - full_a[k], float(np.std(np.subtract(draws_b[k], draws_a[k])))
        bands[k] = {"difference": diff, "std": std, "low": diff - 1.96 * std, "high": diff + 1.96 * std}
    return bands


def open_pipeline(pipeline, dataset: str, num_images: int):
    """Check the arguments shared by scoring and the bound; the pipeline (loaded when a folder), on the GPU
    when there is one."""
    from pipelines import LDMPipeline

    if dataset not in SCORED_DATASETS:
        raise ValueError(f"--dataset must be a scored built-in dataset {SCORED_DATASETS}, got {dataset!r}")
    if num_images < 1:
        raise ValueError(f"--num-images must be positive, got {num_images}")
    pipe = LDMPipeline.from_pretrained(pipeline) if isinstance(pipeline, (str, Path)) else pipeline
    return pipe.to("cuda") if torch.cuda.is_available() else pipe


def evaluate(pipeline, dataset: str, num_images: int = 96, out: str | None = None,
             num_inference_steps: int = 50, guidance_scale: float = 3.0, scheduler: str = "ddpm",
             seed_offset: int = 100_000, batch_size: int = 48, guidance_rescale: float = 0.0,
             variance: str | None = None, conditions: dict | None = None, bootstrap: int = 0) -> dict:
    """Sample and score (module docstring). ``pipeline``: a folder or an `LDMPipeline`; ``variance``: sample a
    learned-variance model with its Σ ("learned", the default for ddpm) or a fixed one (`with_variance`);
    ``conditions``: a model family's own call arguments (SDXL's ``crops_coords_top_left``), checked against the
    pipeline's; ``bootstrap``: resamples for the noise band of each score (`bootstrap_bands`; 0: none)."""
    pipe = open_pipeline(pipeline, dataset, num_images)
    conditions = dict(conditions or {})
    unknown = sorted(set(conditions) - set(inspect.signature(pipe.__call__).parameters))
    if unknown:
        raise ValueError(f"{type(pipe).__name__} takes no {unknown}: these conditions are for other model families")
    original = pipe.scheduler
    pipe.scheduler = with_variance(sampling_scheduler(original, scheduler), variance)
    base = eval_prompts(dataset)
    per_prompt = -(-num_images // len(base))  # ceil: every prompt gets the same number of images
    t0 = time.time()
    prompts, images = generate_for_prompts(pipe, base, per_prompt, seed_offset, batch_size,
                                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                           guidance_rescale=guidance_rescale, **conditions)
    pipe.scheduler = original
    result = {"dataset": dataset, "pipeline": str(pipeline) if isinstance(pipeline, (str, Path)) else None,
              **score(dataset, images, prompts),
              **distribution_scores(dataset, images, prompts),
              "prompts": base, "images_per_prompt": per_prompt, "seeds": [seed_offset, seed_offset + len(prompts) - 1],
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "guidance_rescale": guidance_rescale, "scheduler": scheduler, "variance": variance,
              **({"conditions": conditions} if conditions else {}),
              "sampling_time_s": round(time.time() - t0, 1)}
    if bootstrap:
        result["bands"] = bootstrap_bands(dataset, images, prompts, bootstrap)
    if out:
        out_dir = Path(out)
        grid = make_grid(images, ncols=per_prompt)
        atomic_save(lambda p: grid.save(p, format="PNG"), out_dir / "samples.png")
        atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out_dir / "metrics.json")
    return result
