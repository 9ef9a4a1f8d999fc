"""Score a trained pipeline on a built-in dataset's evaluation prompts.

    python -m ldm.evaluate --pipeline runs/demo/pipeline --dataset shapes --num-images 96 --out runs/demo

For ``shapes`` the prompts are the (colour, shape, position) combinations held out of training; for
``digits`` the ten digits. Seeds start at ``--seed-offset`` (far from any seed the trainer uses).
Writes ``samples.png`` (one row per prompt) and ``metrics.json`` into ``--out``.

    python -m ldm.evaluate --nll --pipeline runs/demo/pipeline --dataset shapes [--nll-stride 10]

reports instead the variational bound on the negative log-likelihood of held-out real images under their
captions, in bits per dimension (``nll.json``): Σ_t L_t + L_T over the full chain, or with ``--nll-stride k``
the terms t < k exactly and an unbiased stratified estimate of the rest from one timestep in every k
(`GaussianDiffusion.nll_bpd`). A pixel model's t = 0 term is the discretized Gaussian of 8-bit images, so
its number compares with published bits/dim; a latent model's is per dimension of its scaled latents (the
posterior mean of each image).

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
from .diffusion import GaussianDiffusion
from .schedulers import SAMPLERS, VARIANCES, sampling_scheduler, with_variance

logger = logging.getLogger(__name__)
REFERENCE_PER_PROMPT = 32
REFERENCE_SEED, FLOOR_SEED = 7, 8  # real images: the reference set, and the sample that gives the floor
NLL_SEED = 9  # the held-out real images whose likelihood is bounded


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
             variance: str | None = None) -> dict:
    """Sample and score (module docstring). ``pipeline``: a folder or an `LDMPipeline`; ``variance``: sample a
    learned-variance model with its Σ ("learned", the default for ddpm) or a fixed one (`with_variance`)."""
    pipe = open_pipeline(pipeline, dataset, num_images)
    original = pipe.scheduler
    pipe.scheduler = with_variance(sampling_scheduler(original, scheduler), variance)
    base = eval_prompts(dataset)
    per_prompt = -(-num_images // len(base))  # ceil: every prompt gets the same number of images
    t0 = time.time()
    prompts, images = generate_for_prompts(pipe, base, per_prompt, seed_offset, batch_size,
                                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                           guidance_rescale=guidance_rescale)
    pipe.scheduler = original
    result = {"dataset": dataset, "pipeline": str(pipeline) if isinstance(pipeline, (str, Path)) else None,
              **score(dataset, images, prompts),
              **distribution_scores(dataset, images, prompts),
              "prompts": base, "images_per_prompt": per_prompt, "seeds": [seed_offset, seed_offset + len(prompts) - 1],
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
              "guidance_rescale": guidance_rescale, "scheduler": scheduler, "variance": variance,
              "sampling_time_s": round(time.time() - t0, 1)}
    if out:
        out_dir = Path(out)
        grid = make_grid(images, ncols=per_prompt)
        atomic_save(lambda p: grid.save(p, format="PNG"), out_dir / "samples.png")
        atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out_dir / "metrics.json")
    return result


@torch.no_grad()
def nll(pipeline, dataset: str, num_images: int = 32, stride: int = 1, batch_size: int = 32, seed: int = 0,
        out: str | None = None) -> dict:
    """The bound on -log p(x | caption) in bits per dimension of ``num_images`` held-out real images of the
    dataset's evaluation prompts (module docstring). ``pipeline``: a folder or an `LDMPipeline`."""
    pipe = open_pipeline(pipeline, dataset, num_images)
    device = pipe.unet.device
    pixels = pipe.vae is None
    diffusion = GaussianDiffusion.from_scheduler_config(pipe.scheduler.config, discrete_decoder=pixels)
    T = diffusion.num_timesteps
    if not (isinstance(stride, int) and 1 <= stride <= T):
        raise ValueError(f"--nll-stride must be an int in [1, {T}] (the model's timesteps), got {stride!r}")
    base = eval_prompts(dataset)
    prompts = [base[i % len(base)] for i in range(num_images)]
    x = to_tensor(real_images(dataset, prompts, NLL_SEED, "heldout")) * 2 - 1  # 8-bit levels in [-1, 1]
    g = torch.Generator().manual_seed(seed)
    t0, parts = time.time(), []
    for i in tqdm(range(0, num_images, batch_size), desc=f"likelihood bound (stride {stride})"):
        xb = x[i:i + batch_size].to(device)
        if not pixels:
            vae = pipe.vae
            z = vae.encode(xb.to(vae.dtype)).latent_dist.mean.float()
            xb = (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
        context = pipe._encode(prompts[i:i + batch_size], 1, device).to(pipe.unet.dtype)
        model = lambda xt, t, c: pipe.unet(xt.to(c.dtype), t, encoder_hidden_states=c).sample.float()  # noqa: E731
        parts.append(diffusion.nll_bpd(model, xb.float(), {"c": context}, generator=g, stride=stride))
    total = torch.cat([p["total_bpd"] for p in parts]).double()
    result = {"nll_bpd": float(total.mean()), "nll_bpd_standard_error": float(total.std() / len(total) ** 0.5)
              if len(total) > 1 else None,
              "prior_bpd": float(torch.cat([p["prior_bpd"] for p in parts]).mean()),
              "decoder_bpd": float(torch.cat([p["decoder_bpd"] for p in parts]).mean()),
              "stride": stride, "num_timesteps": T, "network_passes_per_image": T if stride == 1 else stride + len(range(stride, T, stride)),
              "num_images": num_images, "space": "pixels (8-bit, discretized decoder)" if pixels else "latents",
              "variance": pipe.scheduler.config.get("variance_type"), "dataset": dataset,
              "pipeline": str(pipeline) if isinstance(pipeline, (str, Path)) else None,
              "time_s": round(time.time() - t0, 1)}
    if out:
        atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), Path(out) / "nll.json")
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
    parser.add_argument("--num-images", type=int, default=None, help="images to score (96), or to bound (32)")
    parser.add_argument("--out", default=None, help="folder for samples.png and metrics.json (nll.json)")
    parser.add_argument("--nll", action="store_true", help="bound the likelihood of held-out images instead")
    parser.add_argument("--nll-stride", type=int, default=1, help="1: the full T-step bound; k: one t in every k")
    parser.add_argument("--variance", default=None, choices=list(VARIANCES),
                        help="a learned-variance model's Σ when sampling (default: learned with ddpm)")
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
        if args.nll:
            print(json.dumps(nll(args.pipeline, args.dataset, args.num_images or 32, args.nll_stride, out=args.out),
                             indent=2))
            return
        result = evaluate(args.pipeline, args.dataset, args.num_images or 96, args.out, args.steps,
                          args.guidance_scale, args.scheduler, args.seed_offset,
                          guidance_rescale=args.guidance_rescale, variance=args.variance)
        keys = [k for k in result if k.endswith("_accuracy")] + [
            "frechet_distance", "frechet_distance_floor", "diversity", "diversity_real", "num_images",
            "sampling_time_s"]
        print(json.dumps({k: round(result[k], 4) if isinstance(result[k], float) else result[k] for k in keys},
                         indent=2))
        if "position_confusion" in result:
            print(format_confusion(result["position_confusion"]))


if __name__ == "__main__":
    main()
