"""What a learned variance buys: three models trained with the same budget and seed, sampled at many step
counts, scored, and bounded.

    python -m demos.variance_study --out runs/variance-study        (make variance-study)

The models, on built-in ``shapes`` (the demo's U-Net and schedule, ``--steps`` optimizer steps each;
the defaults fit 20 minutes on a 2-core CPU, so the models are far from converged):

- ``fixed``: L_simple, Σ fixed to β̃_t (DDPM).
- ``hybrid``: L_simple + λ L_vlb with learned Σ, λ = 0.001 (Improved DDPM §3.1).
- ``vlb``: the bound alone trains mean and Σ, timesteps importance-sampled (Sohl-Dickstein et al. 2015;
  Improved DDPM §3.3).

Each is sampled with ancestral DDPM (respaced: the scheduler at n of T steps; learned Σ used where learned)
and with DDIM (deterministic, Σ unused) at every count of ``--sampling-steps``, and every cell is scored
(colour, shape, position, Fréchet distance to held-out real images and its floor, diversity). Each model's
likelihood bound on held-out images is estimated with a stride, and the strided estimate is checked against
the full T-step bound on a small set. Writes ``results.json`` (one record per model x sampler x steps, and
one per model's bound), ``quality_vs_steps.png``, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ldm.engine.config import load_config
from ldm.engine.errors import user_errors
from ldm.eval.likelihood import nll
from ldm.eval.scoring import evaluate
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train
from pipelines.files import atomic_save

logger = logging.getLogger(__name__)

MODELS = {
    "fixed": [],
    "hybrid": ["diffusion.learned_variance=true", "diffusion.vlb_weight=0.001"],
    "vlb": ["diffusion.learned_variance=true", "diffusion.loss_type=vlb", "diffusion.timestep_sampling=importance"],
}
SAMPLERS = ("ddpm", "ddim")
SCORES = ("colour_accuracy", "shape_accuracy", "position_accuracy", "all_accuracy", "frechet_distance",
          "frechet_distance_floor", "diversity", "diversity_real")


def model_config(name: str, out: Path, steps: int, preset: str, extra: list[str]) -> LDMConfig:
    return load_config(LDMConfig, preset, [
        f"output_dir={out}", f"name={name}", f"train.max_steps={steps}", "train.validate_every=0",
        "train.score_num_images=0", "train.tensorboard=false", "train.checkpoint_every=0", *MODELS[name], *extra])


def run_study(out: Path, steps: int = 250, sampling_steps=(10, 25, 50, 100, 250), num_images: int = 48,
              guidance_scale: float = 1.0, nll_images: int = 32, nll_stride: int = 50, check_images: int = 4,
              preset: str = "configs/ldm/shapes.yaml", models=tuple(MODELS), extra: list[str] = ()) -> dict:
    from ldm.eval.scorers import eval_prompts
    from pipelines import LDMPipeline

    prompts = len(eval_prompts("shapes"))
    if num_images < 2 * prompts:
        raise ValueError(f"--num-images must be at least {2 * prompts} (two per held-out prompt, for diversity), "
                         f"got {num_images}")
    out.mkdir(parents=True, exist_ok=True)
    records, t0 = [], time.time()
    for name in models:
        cfg = model_config(name, out, steps, preset, list(extra))
        logger.info("training %s (%d steps)", name, steps)
        summary = train(cfg)
        pipe = LDMPipeline.from_pretrained(cfg.run_dir / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        for sampler in SAMPLERS:
            for n in sampling_steps:
                r = evaluate(pipe, "shapes", num_images=num_images, num_inference_steps=n,
                             guidance_scale=guidance_scale, scheduler=sampler, seed_offset=200_000)
                records.append({"model": name, "sampler": sampler, "steps": n,
                                **{k: r[k] for k in SCORES}, "sampling_time_s": r["sampling_time_s"]})
                logger.info("%s %s %d: shape %.3f FD %.3f", name, sampler, n, r["shape_accuracy"],
                            r["frechet_distance"])
        record = bound_record(pipe, name, nll_images, nll_stride, check_images)
        record.update(train_time_s=summary.get("train_time_s"), final_loss=summary.get("final_loss"))
        records.append(record)
        atomic_save(lambda p: Path(p).write_text(json.dumps(records, indent=2)), out / "results.json")
    plot(records, out / "quality_vs_steps.png")
    result = {"records": records, "time_s": round(time.time() - t0, 1)}
    atomic_save(lambda p: Path(p).write_text(json.dumps({**result, "settings": {
        "train_steps": steps, "sampling_steps": list(sampling_steps), "num_images": num_images,
        "guidance_scale": guidance_scale, "preset": preset, "extra": list(extra)}}, indent=2)), out / "results.json")
    return result


def bound_record(pipe, name: str, nll_images: int, nll_stride: int, check_images: int) -> dict:
    """One model's likelihood bound on held-out images (strided), and the strided estimate against the full
    T-step bound on the first ``check_images`` of them."""
    bound = nll(pipe, "shapes", nll_images, nll_stride)
    record = {"model": name, "nll_bpd": bound["nll_bpd"], "nll_bpd_standard_error": bound["nll_bpd_standard_error"],
              "nll_stride": nll_stride, "nll_images": nll_images, "prior_bpd": bound["prior_bpd"],
              "decoder_bpd": bound["decoder_bpd"], "nll_passes_per_image": bound["network_passes_per_image"]}
    if check_images:
        full, strided = nll(pipe, "shapes", check_images, 1), nll(pipe, "shapes", check_images, nll_stride)
        record.update(check_images=check_images, check_full_bpd=full["nll_bpd"], check_strided_bpd=strided["nll_bpd"],
                      check_full_standard_error=full["nll_bpd_standard_error"])
    return record


def rebound(out: Path, nll_images: int = 32, nll_stride: int = 50, check_images: int = 4) -> dict:
    """Bound again the models a finished study left in ``out`` (no training, no sampling): its results.json
    gets new bound records, the sampling cells kept."""
    from pipelines import LDMPipeline

    saved = json.loads((out / "results.json").read_text())
    cells = [r for r in saved["records"] if "sampler" in r]
    old = {r["model"]: r for r in saved["records"] if "nll_bpd" in r}
    records = list(cells)
    for name in old:
        pipe = LDMPipeline.from_pretrained(out / name / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        records.append({**bound_record(pipe, name, nll_images, nll_stride, check_images),
                        **{k: old[name][k] for k in ("train_time_s", "final_loss") if k in old[name]}})
    saved["records"] = records
    atomic_save(lambda p: Path(p).write_text(json.dumps(saved, indent=2)), out / "results.json")
    return saved


def plot(records: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in records if "sampler" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for model in dict.fromkeys(r["model"] for r in cells):
        for sampler, style in zip(SAMPLERS, ("-o", "--s")):
            rows = sorted((r for r in cells if r["model"] == model and r["sampler"] == sampler), key=lambda r: r["steps"])
            steps = [r["steps"] for r in rows]
            axes[0].plot(steps, [r["frechet_distance"] for r in rows], style, label=f"{model} {sampler}")
            axes[1].plot(steps, [r["shape_accuracy"] for r in rows], style, label=f"{model} {sampler}")
    if cells:
        axes[0].axhline(cells[0]["frechet_distance_floor"], color="grey", lw=0.8, label="real-vs-real floor")
    for ax, title in zip(axes, ("Fréchet distance (lower is better)", "shape accuracy")):
        ax.set_xscale("log"), ax.set_xlabel("sampling steps"), ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_save(lambda p: fig.savefig(p, format="png"), png)
    plt.close(fig)


def format_table(records: list[dict]) -> str:
    cells = [r for r in records if "sampler" in r]
    lines = [f"{'model':8}{'sampler':8}{'steps':>6}{'colour':>8}{'shape':>7}{'posn':>7}{'FD':>8}{'floor':>7}{'div':>7}"]
    for r in cells:
        lines.append(f"{r['model']:8}{r['sampler']:8}{r['steps']:>6}{r['colour_accuracy']:>8.3f}{r['shape_accuracy']:>7.3f}"
                     f"{r['position_accuracy']:>7.3f}{r['frechet_distance']:>8.3f}{r['frechet_distance_floor']:>7.3f}"
                     f"{r['diversity']:>7.3f}")
    for r in records:
        if "nll_bpd" in r:
            check = (f"; on {r['check_images']} images full bound {r['check_full_bpd']:.4f} vs strided "
                     f"{r['check_strided_bpd']:.4f}") if "check_full_bpd" in r else ""
            lines.append(f"{r['model']}: NLL bound {r['nll_bpd']:.4f} ± {r['nll_bpd_standard_error']:.4f} bits/dim "
                         f"(stride {r['nll_stride']}, {r['nll_images']} images){check}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/variance-study")
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps per model")
    parser.add_argument("--sampling-steps", type=int, nargs="+", default=[10, 25, 50, 100, 250])
    parser.add_argument("--num-images", type=int, default=48, help="images per cell (16 held-out prompts)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="1: unguided, as Improved DDPM's comparisons (and half the sampling time)")
    parser.add_argument("--nll-images", type=int, default=32)
    parser.add_argument("--nll-stride", type=int, default=50)
    parser.add_argument("--check-images", type=int, default=4, help="images for the full-bound check (0: skip)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--preset", default="configs/ldm/shapes.yaml")
    parser.add_argument("--rebound", action="store_true",
                        help="only bound again the models of a finished study in --out (keeps its sampling cells)")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every model (key=value)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        logging.basicConfig(level=logging.INFO)
        if args.rebound:
            print(format_table(rebound(Path(args.out), args.nll_images, args.nll_stride, args.check_images)["records"]))
            return
        result = run_study(Path(args.out), args.steps, tuple(args.sampling_steps), args.num_images,
                           args.guidance_scale, args.nll_images, args.nll_stride, args.check_images, args.preset,
                           tuple(args.models), args.overrides)
        print(format_table(result["records"]))
        print(f"wrote {args.out}/results.json and {args.out}/quality_vs_steps.png ({result['time_s']:.0f} s)")


if __name__ == "__main__":
    main()
