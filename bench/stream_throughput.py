"""Training throughput from streamed webdataset shards against today's cached image folder, on the same images,
one after the other in this process.

- **cached folder**: ``data.dataset`` is an image folder with metadata.jsonl; every image is encoded by the VAE
  once (the latent cache) and every caption by the text encoder once, then each step reads the caches.
- **streamed shards**: the same images packed into webdataset shards (``python -m ldm.data.stream pack``) and
  streamed: each step decodes its images, cuts them, encodes them with the VAE and its captions with the text
  encoder.
- **streamed latent shards**: those shards encoded once by ``python -m ldm.precompute`` (its time reported as
  ``precompute_s``) and streamed: each step reads posteriors and encodes its captions.

Both train the same preset (default ``configs/ldm/shapes.yaml``, the demo's model) for ``--steps`` steps; each
side's images/s is the mean of ``images_per_s`` over the metrics rows after ``--warmup`` steps. The ratio printed
and saved are streamed / cached and streamed latents / cached (below 1: fewer images per second than the cached
folder). The cached side's one-off
cost of building its caches is in its ``wall_s`` (the whole run: set-up, training, the final validation, export).

    OMP_NUM_THREADS=2 python bench/stream_throughput.py --out bench/results/stream_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(preset: str, name: str, dataset: str, root: Path, steps: int, warmup: int, extra: list[str]) -> dict:
    from ldm.engine.config import load_config
    from ldm.engine.records import read_metrics
    from ldm.trainer.config import LDMConfig
    from ldm.trainer.train import train

    cfg = load_config(LDMConfig, preset, [
        f"name={name}", f"output_dir={root / 'runs'}", f"data.dataset={dataset}", f"data.cache_dir={root / 'cache'}",
        f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=0", "train.validate_every=0",
        "train.score_num_images=0", "train.tensorboard=false", "data.validation_num_images=8", "sample.seeds=[0]",
        "sample.num_inference_steps=2", *extra])
    t0 = time.time()
    train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "images_per_s" in r and "epoch" in r]
    steady = [r["images_per_s"] for r in rows if r["step"] > warmup]
    return {"images_per_s": round(sum(steady) / len(steady), 2), "steps": steps, "warmup_steps": warmup,
            "wall_s": round(time.time() - t0, 1)}  # set-up (caches, when built), training, validation, export


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=str(ROOT / "configs/ldm/shapes.yaml"))
    parser.add_argument("--images", type=int, default=512, help="built-in shapes images to train on")
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = parser.parse_args(argv)

    import torch

    from ldm.data.builtin import generate_shapes
    from ldm.data.stream import pack_folder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = generate_shapes(root / "shapes", num_images=args.images, seed=0)
        shards = pack_folder(folder, root / "shards", args.per_shard)
        result = {
            "cached_folder": run(args.preset, "cached", str(folder), root, args.steps, args.warmup, args.overrides),
            "streamed_shards": run(args.preset, "streamed", str(root / "shards"), root, args.steps, args.warmup,
                                   args.overrides),
        }
        from ldm.engine.config import load_config
        from ldm.precompute import precompute
        from ldm.trainer.config import LDMConfig

        t0 = time.time()
        precompute(load_config(LDMConfig, args.preset, [f"data.dataset={root / 'shards'}", *args.overrides]),
                   root / "latents")
        spent = round(time.time() - t0, 1)
        result["streamed_latent_shards"] = {**run(args.preset, "latents", str(root / "latents"), root, args.steps,
                                                  args.warmup, args.overrides), "precompute_s": spent}
    cached = result["cached_folder"]["images_per_s"]
    result["ratio_streamed_over_cached"] = round(result["streamed_shards"]["images_per_s"] / cached, 3)
    result["ratio_streamed_latents_over_cached"] = round(result["streamed_latent_shards"]["images_per_s"] / cached, 3)
    result.update({"images": args.images, "shards": len(shards), "preset": Path(args.preset).name,
                   "overrides": args.overrides, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "device": "cuda" if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})",
                   "command": "python bench/stream_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])})
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
