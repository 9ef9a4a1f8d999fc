"""Score a trained pipeline on a built-in dataset's evaluation prompts.

    python -m ldm.evaluate --pipeline runs/demo/pipeline --dataset shapes --num-images 96 --out runs/demo

writes ``samples.png`` (one row per prompt) and ``metrics.json`` into ``--out``: the scorer's accuracies, the
Fréchet distance to real images of the same prompts and its real-vs-real floor, and the diversity of each
prompt's images (`ldm.eval.scoring`).

    python -m ldm.evaluate --nll --pipeline runs/demo/pipeline --dataset shapes [--nll-stride 10]

reports instead the variational bound on the negative log-likelihood of held-out real images under their
captions, in bits per dimension (``nll.json``; `ldm.eval.likelihood`)."""

from __future__ import annotations

import argparse
import json
import logging

from ldm.diffusion.schedulers import SAMPLERS, VARIANCES
from ldm.engine.errors import user_errors
from ldm.eval.likelihood import nll
from ldm.eval.scorers import SCORED_DATASETS
from ldm.eval.scoring import evaluate

logger = logging.getLogger(__name__)


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
    parser.add_argument("--crop", type=int, nargs=2, default=None, metavar=("TOP", "LEFT"),
                        help="SDXL pipelines: the crop condition (crops_coords_top_left) to draw with (default 0 0)")
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="resamples for a 95%% band of each score (0: none; 200 is plenty)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        logging.basicConfig(level=logging.INFO)
        if args.nll:
            print(json.dumps(nll(args.pipeline, args.dataset, args.num_images or 32, args.nll_stride, out=args.out),
                             indent=2))
            return
        result = evaluate(args.pipeline, args.dataset, num_images=args.num_images or 96, out=args.out,
                          num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          scheduler=args.scheduler, seed_offset=args.seed_offset,
                          guidance_rescale=args.guidance_rescale, variance=args.variance,
                          conditions={"crops_coords_top_left": tuple(args.crop)} if args.crop else None,
                          bootstrap=args.bootstrap)
        keys = [k for k in result if k.endswith("_accuracy")] + [
            "frechet_distance", "frechet_distance_floor", "diversity", "diversity_real", "num_images",
            "sampling_time_s"]
        print(json.dumps({k: round(result[k], 4) if isinstance(result[k], float) else result[k] for k in keys},
                         indent=2))
        for k, band in result.get("bands", {}).items():
            print(f"{k}: 95% band {band['low']:.4f} to {band['high']:.4f} (bootstrap std {band['std']:.4f})")
        if "position_confusion" in result:
            print(format_confusion(result["position_confusion"]))


if __name__ == "__main__":
    main()
