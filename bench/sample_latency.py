"""Sampling latency of this project's `LDMPipeline`, eager and with ``enable_fast()``, against diffusers'
`StableDiffusionPipeline`, eager and compiled the way ``shared/bench/diffusers_baseline.py`` measured it
(channels-last U-Net, ``torch.compile(mode="reduce-overhead", fullgraph=True)``). Every side loads the same
pipeline folder afresh, in one process, and draws the same prompts with the same scheduler (DPM++ 2M), steps
and classifier-free guidance, at batch 1 and 8:

- **cold**: the first call at that batch size, compilation included (what a user waits for the first image);
- **warm**: the median of ``--reps`` calls after one more untimed call.

``ours-fast`` is ``enable_fast()`` as shipped (regional compilation), ``ours-fast-full`` is
``enable_fast(compile="full")`` (one graph; CUDA graphs on a GPU).

It also records how far each side's images are from our eager ones at batch 1 (same seed): the fast paths
change speed, not images. The ratios printed and saved are diffusers' time / ours (above 1: ours is faster).

    OMP_NUM_THREADS=2 python bench/sample_latency.py --preset cpu-tiny               # a few minutes on 2 cores
    python bench/sample_latency.py --preset sd15 --out bench/results/h100_sample.json   # one GPU

``sd15`` builds Stable Diffusion 1.5's U-Net, an SD-architecture VAE and a CLIP-L-size text encoder with random
weights at 512 px in fp16 (30 steps, guidance 7.5, as the baseline); ``cpu-tiny`` the demo-size components at
32 px in fp32. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS = ["a red circle at the top left", "a blue square at the bottom right", "a green triangle in the centre",
           "a yellow circle at the top right", "a purple square at the bottom left", "a red triangle at the top left",
           "a blue circle in the centre", "a green square at the top right"]
SIDES = ("ours-eager", "ours-fast", "ours-fast-full", "diffusers-eager", "diffusers-compiled")

PRESETS = {
    "cpu-tiny": {"unet": dict(block_out_channels=[64, 128], layers_per_block=1,
                              down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=8,
                              norm_num_groups=32),
                 "vae": dict(block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4,
                             norm_num_groups=32),
                 "text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              max_length=16),
                 "resolution": 32, "dtype": "float32", "steps": 30, "guidance": 7.5, "batches": "1,8", "reps": 5},
    "sd15": {"unet": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                          down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, attention_head_dim=8,
                          norm_num_groups=32),
             "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                         norm_num_groups=32),
             "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          max_length=77),
             "resolution": 512, "dtype": "float16", "steps": 30, "guidance": 7.5, "batches": "1,8", "reps": 3},
}


def make_folder(folder: Path, preset: dict) -> Path:
    """A Stable Diffusion 1.x folder with random weights of the preset's sizes (our tokenizer, learned from the
    prompts; a DPM++ 2M scheduler)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ldm.models.text import build_text_encoder, build_tokenizer

    torch.manual_seed(0)
    t = preset["text"]
    tok = build_tokenizer(PROMPTS, vocab_size=49408, max_length=t["max_length"])
    te = build_text_encoder(tok, t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
                            t["intermediate_size"])
    v = preset["vae"]
    levels = len(v["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
                        up_block_types=["UpDecoderBlock2D"] * levels, sample_size=preset["resolution"],
                        scaling_factor=0.18215, **v)
    unet = UNet2DConditionModel(sample_size=preset["resolution"] // 2 ** (levels - 1), in_channels=4,
                                out_channels=4, cross_attention_dim=t["hidden_size"], **preset["unet"])
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_side(side: str, folder: Path, dtype: torch.dtype, device: str):
    """A freshly loaded pipeline for one side, with that side's speed settings."""
    from diffusers import StableDiffusionPipeline

    from pipelines import LDMPipeline

    cls = LDMPipeline if side.startswith("ours") else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if side == "ours-fast":  # the defaults: regional compilation
        pipe.enable_fast()
    elif side == "ours-fast-full":
        pipe.enable_fast(compile="full")
    elif side == "diffusers-compiled":  # as the baseline: channels-last, CUDA graphs, one graph
        pipe.unet.to(memory_format=torch.channels_last)
        mode = "reduce-overhead" if device == "cuda" else None
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    return pipe


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_side(pipe, batch: int, args, device: str) -> tuple[dict, np.ndarray]:
    """(cold and warm seconds of one call at ``batch``, the images of the cold call)."""
    kw = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "output_type": "np"}
    prompts = (PROMPTS * batch)[:batch]

    def call():
        sync(device)
        t = time.perf_counter()
        images = pipe(prompts, generator=torch.Generator(device).manual_seed(0), **kw).images
        sync(device)
        return time.perf_counter() - t, images

    cold, images = call()
    call()
    warm = statistics.median(call()[0] for _ in range(args.reps))
    return {"cold_s": round(cold, 3), "warm_s": round(warm, 4), "images_per_s": round(batch / warm, 2)}, images


def warm_process(folder: Path, dtype, device: str, batches: list[int], args) -> None:
    """Untimed eager calls first, so that the first side timed does not pay the process's own warm-up (thread
    pools, allocator, kernels loaded): measured on CPU, it made whichever side ran first 20-40 % slower."""
    pipe = load_side("diffusers-eager", folder, dtype, device)
    for batch in batches:
        for _ in range(2):
            pipe((PROMPTS * batch)[:batch], num_inference_steps=args.steps, guidance_scale=args.guidance,
                 output_type="np")
    del pipe
    gc.collect()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    p.add_argument("--steps", type=int, help="DPM++ steps per image")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--batches", help="comma list of batch sizes")
    p.add_argument("--reps", type=int, help="timed warm calls (median)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma list out of {', '.join(SIDES)}")
    p.add_argument("--folder", type=Path, help="an existing pipeline folder instead of the preset's random one")
    p.add_argument("--out", type=Path, default=Path("sample_latency.json"))
    p.add_argument("--side-only", choices=SIDES, help=argparse.SUPPRESS)  # one side, in the process main starts
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    bad = [s for s in args.sides.split(",") if s not in SIDES]
    if bad:
        p.error(f"--sides: {bad} not in {list(SIDES)}")
    return args


def run_side(side: str, folder: Path, args, out: Path) -> None:
    """One side in this process (started fresh by `main`): its timings to ``out`` (JSON) and its first batch's
    images beside it (.npy)."""
    preset = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, preset["dtype"]) if device == "cuda" else torch.float32
    batches = [int(b) for b in str(args.batches).split(",") if b]
    warm_process(folder, dtype, device, batches, args)
    t = time.perf_counter()
    pipe = load_side(side, folder, dtype, device)
    row = {"load_s": round(time.perf_counter() - t, 2)}
    for batch in batches:
        row[f"batch_{batch}"], images = time_side(pipe, batch, args, device)
        if batch == batches[0]:
            np.save(out.with_suffix(".npy"), images)
    out.write_text(json.dumps({"row": row, "dtype": str(dtype).removeprefix("torch.")}))


def main(argv=None) -> dict:
    """Each side runs in a fresh process with an empty inductor cache, so its cold time is what a user's first
    call costs (in one process, a side would reuse the code an earlier side compiled)."""
    import subprocess

    args = parse_args(argv)
    if args.side_only:
        run_side(args.side_only, args.folder, args, args.out)
        return {}
    preset = PRESETS[args.preset]
    batches = [int(b) for b in str(args.batches).split(",") if b]
    results = {"device": device_name(), "torch": torch.__version__, "preset": args.preset, "steps": args.steps,
               "guidance_scale": args.guidance, "resolution": preset["resolution"], "batches": batches,
               "reps": args.reps, "sides": {}}
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as tmp:
        tmp = Path(tmp)
        folder = args.folder or make_folder(tmp / "pipe", preset)
        reference = None
        for side in args.sides.split(","):
            out = tmp / f"{side}.json"
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{side}")}
            subprocess.run([sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
                            "--guidance", str(args.guidance), "--batches", str(args.batches), "--reps",
                            str(args.reps), "--folder", str(folder), "--side-only", side, "--out", str(out)],
                           env=env, check=True)
            got = json.loads(out.read_text())
            row, results["dtype"] = got["row"], got["dtype"]
            images = np.load(out.with_suffix(".npy"))
            reference = images if reference is None else reference
            row["max_abs_diff_to_first_side"] = float(np.abs(images - reference).max())
            results["sides"][side] = row
            print(side, json.dumps(row), flush=True)
    results["ratios"] = ratios(results["sides"], batches)
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return results


def ratios(sides: dict, batches: list[int]) -> dict:
    """diffusers' warm (and cold) time / ours, eager against eager and compiled against fast."""
    out = {}
    for ours, theirs in (("ours-eager", "diffusers-eager"), ("ours-fast", "diffusers-compiled"),
                         ("ours-fast-full", "diffusers-compiled"), ("ours-fast", "diffusers-eager")):
        if ours in sides and theirs in sides:
            for b in batches:
                for kind in ("warm_s", "cold_s"):
                    out[f"{theirs}/{ours} batch {b} {kind[:-2]}"] = round(
                        sides[theirs][f"batch_{b}"][kind] / sides[ours][f"batch_{b}"][kind], 3)
    return out


def format_table(r: dict) -> str:
    lines = [f"sampling latency, {r['preset']}: {r['device']}, torch {r['torch']}, {r['dtype']}, "
             f"{r['resolution']} px, {r['steps']} DPM++ steps, guidance {r['guidance_scale']}",
             f"{'side':<20}" + "".join(f"{f'B{b} warm s':>12}{f'B{b} cold s':>12}{f'B{b} img/s':>11}"
                                       for b in r["batches"]) + f"{'max diff':>10}"]
    for side, row in r["sides"].items():
        lines.append(f"{side:<20}" + "".join(f"{row[f'batch_{b}']['warm_s']:>12.3f}{row[f'batch_{b}']['cold_s']:>12.1f}"
                                             f"{row[f'batch_{b}']['images_per_s']:>11.2f}" for b in r["batches"])
                     + f"{row['max_abs_diff_to_first_side']:>10.1e}")
    lines += [f"{k} = {v:.2f}" for k, v in r["ratios"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
