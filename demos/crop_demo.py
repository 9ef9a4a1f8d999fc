"""What SDXL's crop condition does in a model trained on crops: the same prompts drawn under different
``crops_coords_top_left``, and where the shape lands.

    python -m demos.crop_demo --pipeline runs/demo-xl/pipeline --out runs/demo-xl/crops

`configs/ldm/shapes-xl.yaml` trains on 32 px windows of images resized to 40 px (``data.crop_scale=1.25``, a new
window each step), each window's (top, left) in its time_ids. A shape drawn at the centre of the 40 px image sits
at (20 - left, 20 - top) in a window: a model that reads its crop condition moves the shape by minus the crop,
as SDXL's crop conditioning moves (and cuts) the subject. For prompts of shapes at the centre, every colour and
shape, ``--per-prompt`` seeds each, the demo draws under each crop of ``--crops`` with the same seeds and measures
the shape's centroid (`ldm.eval.scorers.blob_centroid`), against the position the data's geometry predicts.

Writes ``results.json`` (per crop: mean centroid, its shift from the first crop's, the predicted shift, the
fraction of images with a shape) and ``grid.png`` (a row per crop, the same seeds in each column) into ``--out``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path

import numpy as np

from ldm.data.builtin import COLOURS, SHAPES, shapes_caption
from ldm.engine.errors import user_errors
from ldm.engine.records import make_grid
from ldm.eval.scorers import blob_centroid
from ldm.eval.scoring import generate
from pipelines.files import atomic_save

logger = logging.getLogger(__name__)

CROPS = ((0, 0), (4, 4), (8, 8), (0, 8), (8, 0))  # (top, left), pixels of the 40 px resized image


def predicted(crop: tuple[int, int], resized: int, resolution: int) -> tuple[float, float]:
    """Where a shape drawn at the centre of the resized image lands in the window at ``crop`` (top, left): (x, y)."""
    top, left = crop
    centre = resized / 2
    if not (0 <= top <= resized - resolution and 0 <= left <= resized - resolution):
        raise ValueError(f"crop {crop} is outside the {resized} px image for a {resolution} px window")
    return centre - left, centre - top


def draw_crops(pipe, crops, per_prompt: int, steps: int, guidance_scale: float, seed: int = 0) -> dict:
    """Images of every centre prompt under each crop, the same seeds for every crop: {crop: (prompts, images)}."""
    base = [shapes_caption(c, s, "center") for c in COLOURS for s in SHAPES]
    prompts = [p for p in base for _ in range(per_prompt)]
    seeds = [seed + i for i in range(len(prompts))]
    out = {}
    for crop in crops:
        logger.info("drawing %d images with crops_coords_top_left=%s", len(prompts), crop)
        out[tuple(crop)] = generate(pipe, prompts, seeds, num_inference_steps=steps, guidance_scale=guidance_scale,
                                    crops_coords_top_left=tuple(crop))
    return out


def measure(drawn: dict, resized: int, resolution: int) -> list[dict]:
    """Per crop: the mean centroid of the images with a shape, its shift from the first crop's, and the
    predicted position and shift."""
    rows, first = [], None
    for crop, images in drawn.items():
        found = [c for c in map(blob_centroid, images) if c is not None]
        mean = np.mean(found, axis=0) if found else np.array([np.nan, np.nan])
        want = np.array(predicted(crop, resized, resolution))
        first = (mean, want) if first is None else first
        rows.append({"crop_top_left": list(crop), "centroid_xy": [round(float(v), 2) for v in mean],
                     "predicted_xy": [round(float(v), 2) for v in want],
                     "shift_xy": [round(float(v), 2) for v in mean - first[0]],
                     "predicted_shift_xy": [round(float(v), 2) for v in want - first[1]],
                     "centroid_std_xy": [round(float(v), 2) for v in (np.std(found, axis=0) if found else [0, 0])],
                     "with_shape": round(len(found) / len(images), 3), "num_images": len(images)})
    return rows


def run(args) -> dict:
    from pipelines import LDMPipeline

    pipe = LDMPipeline.from_pretrained(args.pipeline)
    if "crops_coords_top_left" not in inspect.signature(pipe.__call__).parameters:
        raise ValueError(f"{args.pipeline} holds a {pipe.family} model, which has no crop condition: give an SDXL "
                         f"pipeline (make demo-xl writes runs/demo-xl/pipeline)")
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    resized = round(resolution * args.crop_scale)
    drawn = draw_crops(pipe, [tuple(c) for c in args.crops], args.per_prompt, args.steps, args.guidance_scale)
    result = {"pipeline": str(args.pipeline), "resolution": resolution, "resized": resized,
              "steps": args.steps, "guidance_scale": args.guidance_scale, "per_prompt": args.per_prompt,
              "crops": measure(drawn, resized, resolution)}
    out = Path(args.out)
    grid = make_grid([im for images in drawn.values() for im in images[:args.grid_columns]], ncols=args.grid_columns)
    atomic_save(lambda p: grid.save(p, format="PNG"), out / "grid.png")
    atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out / "results.json")
    for row in result["crops"]:
        print(f"crop (top, left) {tuple(row['crop_top_left'])}: centroid (x, y) {tuple(row['centroid_xy'])}, "
              f"predicted {tuple(row['predicted_xy'])}; shift {tuple(row['shift_xy'])}, predicted "
              f"{tuple(row['predicted_shift_xy'])}; with a shape {row['with_shape']}")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="an SDXL pipeline trained on crops (runs/demo-xl/pipeline)")
    parser.add_argument("--out", default="runs/demo-xl/crops")
    parser.add_argument("--crops", type=int, nargs=2, action="append", metavar=("TOP", "LEFT"), default=None,
                        help=f"a crop condition to draw with, repeatable (default {' '.join(map(str, CROPS))})")
    parser.add_argument("--crop-scale", type=float, default=1.25, help="data.crop_scale the model was trained with")
    parser.add_argument("--per-prompt", type=int, default=2, help="seeds per centre prompt (18 prompts)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=1.5)
    parser.add_argument("--grid-columns", type=int, default=12)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    args.crops = args.crops or [list(c) for c in CROPS]
    with user_errors(args.debug):
        logging.basicConfig(level=logging.INFO)
        run(args)


if __name__ == "__main__":
    main()
