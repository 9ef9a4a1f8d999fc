"""What a learned variance buys: three models trained with the same budget and seed, sampled at many step
counts, scored with a noise band, and bounded; on latents and on pixels.

    python -m demos.variance_study --out runs/variance-study                    (make variance-study)
    python -m demos.variance_study --plan full --out runs/variance-study-full   (make variance-study-full)

The models, on built-in ``shapes`` (a preset's U-Net, schedule and objective; the same optimizer steps, batch
and seed for each):

- ``fixed``: L_simple, Σ fixed to β̃_t (DDPM).
- ``hybrid``: L_simple + λ L_vlb with learned Σ, λ = 0.001 (Improved DDPM §3.1).
- ``vlb``: the bound alone trains mean and Σ, timesteps importance-sampled (Sohl-Dickstein et al. 2015;
  Improved DDPM §3.3).

Each is sampled with ancestral DDPM (respaced: the scheduler at n of T steps; learned Σ used where learned)
and, where the plan says, DDIM (deterministic, Σ unused) at every step count of the plan. Every cell is scored
(colour, shape, position, Fréchet distance to held-out real images and its floor, diversity) with a bootstrap
95 % band over its images. Each model's likelihood bound on held-out images is estimated with a stride and
checked against the full T-step bound on a small set: bits per dimension of the scaled latents, or of 8-bit
pixels (a discretized decoder, the literature's unit) in pixel space. Paired cells (a space's ``paired_steps``)
draw every model from the same seeds with more images and read each model's difference from ``fixed`` with a
band on the difference itself, narrow enough to tell apart models whose own bands overlap.

Plans (`PLANS`): ``quick`` is the latent study at 250 steps (about 12 minutes on a 2-core CPU; the models are far
from converged); ``full`` trains each latent model for the demo's 900 steps and each pixel model for the pixel
preset's 1000, samples at the demo's guidance, and fits about 2 hours on 2 cores. A study is resumable: every
finished training, cell and bound is in ``results.json`` at once, and a rerun with the same settings and
``--out`` goes on from there (a model interrupted mid-training resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
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
# How a cell's 95 % band is made (`ldm.eval.scoring.bootstrap_bands`); a study whose bands were made otherwise is not
# gone on with.
BANDS = "accuracy: bootstrap percentiles; Frechet distance: estimate +- 1.96 bootstrap std"
SCORES = ("colour_accuracy", "shape_accuracy", "position_accuracy", "all_accuracy", "frechet_distance",
          "frechet_distance_floor", "diversity", "diversity_real")


@dataclass(frozen=True)
class Space:
    """One setting of the study: the preset its models train from and how each is sampled."""

    preset: str
    train_steps: int
    sampling_steps: tuple[int, ...] = (10, 25, 50, 100, 250)
    samplers: tuple[str, ...] = SAMPLERS
    num_images: int = 48  # per cell, a multiple of the 16 held-out prompts
    overrides: tuple[str, ...] = ()  # config overrides of this space's models (before the study's own)
    # Paired cells: every model drawn by ancestral DDPM at these step counts from the same seeds, with more
    # images, each scored against the first model with a band on the difference (`paired_cells`).
    paired_steps: tuple[int, ...] = ()
    paired_images: int = 0


# Settings that only add cells: a study started without them goes on with them, its cells done kept.
ADDS_CELLS = ("paired_steps", "paired_images")


PLANS = {
    # 250 steps: the models are far from converged (docs/results.md, "Learned variance").
    "quick": {"spaces": {"latent": Space("configs/ldm/shapes.yaml", 250)}, "guidance_scale": 1.0},
    # The demo's 900 steps (and the pixel preset's 1000), at the demo's guidance; 96 images per latent cell.
    # Pixel sampling is 3x a latent step's cost, so DDPM only there: DDIM does not use Σ.
    # Paired cells at few steps, where Improved DDPM's learned Σ is meant to pay, with 5x (latent) and 4x (pixel)
    # the images.
    "full": {"spaces": {"latent": Space("configs/ldm/shapes.yaml", 900, num_images=96, paired_steps=(2, 5, 10, 25),
                                        paired_images=480),
                        "pixel": Space("configs/ldm/shapes-pixel.yaml", 1000, (10, 25, 50, 250), ("ddpm",), 48,
                                       paired_steps=(10, 25, 50), paired_images=192)},
             "guidance_scale": 1.5},
}


def model_config(name: str, out: Path, steps: int, preset: str, extra: list[str]) -> LDMConfig:
    """A study model's config: checkpoints every 300 steps and ``train.resume=latest``, so an interrupted study
    goes on from its last checkpoint."""
    return load_config(LDMConfig, preset, [
        f"output_dir={out}", f"name={name}", f"train.max_steps={steps}", "train.validate_every=0",
        "train.score_num_images=0", "train.tensorboard=false", "train.checkpoint_every=300",
        "train.resume=latest", *MODELS[name], *extra])


def load_records(out: Path, settings: dict) -> list[dict]:
    """The records of an earlier run of this study in ``out`` (to go on from), or none; a study with other
    settings there is refused, naming them."""
    path = out / "results.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    old, new = _without_added_cells(saved.get("settings", {})), _without_added_cells(settings)
    diff = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"{out} holds a study with other settings ({', '.join(f'{k}: {old.get(k)!r}' for k in diff)}"
                         f"); give another --out, or remove {path} to start afresh")
    logger.info("going on with the study in %s: %d records done", out, len(saved["records"]))
    return saved["records"]


def _without_added_cells(settings: dict) -> dict:
    settings = json.loads(json.dumps(settings))
    for space in settings.get("spaces", {}).values():
        for k in ADDS_CELLS:
            space.pop(k, None)
    return settings


def _key(r: dict) -> tuple:
    if "paired_steps" in r:
        return "paired", r["space"], None, "ddpm", r["paired_steps"]
    kind = "cell" if "sampler" in r else "bound" if "nll_bpd" in r else "train"
    return kind, r.get("space", "latent"), r["model"], r.get("sampler"), r.get("steps")


def run_study(out: Path, spaces: dict[str, Space], guidance_scale: float = 1.0, nll_images: int = 32,
              nll_stride: int = 50, check_images: int = 4, models=tuple(MODELS), extra: list[str] = (),
              bootstrap: int = 200) -> dict:
    from ldm.eval.scorers import eval_prompts

    prompts = len(eval_prompts("shapes"))
    for space in spaces.values():
        if space.num_images < 2 * prompts:
            raise ValueError(f"--num-images must be at least {2 * prompts} (two per held-out prompt, for diversity), "
                             f"got {space.num_images}")
    settings = {"spaces": {k: dataclasses.asdict(v) for k, v in spaces.items()}, "guidance_scale": guidance_scale,
                "models": list(models), "extra": list(extra), "bootstrap": bootstrap, "bands": BANDS,
                "nll_images": nll_images, "nll_stride": nll_stride, "check_images": check_images}
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
    out.mkdir(parents=True, exist_ok=True)
    records, t0 = load_records(out, settings), time.time()
    done = {_key(r) for r in records}

    def save(record: dict) -> None:
        records.append(record)
        done.add(_key(record))
        atomic_save(lambda p: Path(p).write_text(json.dumps({"records": records, "settings": settings}, indent=2)),
                    out / "results.json")

    for space_name, space in spaces.items():
        for name in models:
            study_model(out, space_name, space, name, guidance_scale, (nll_images, nll_stride, check_images),
                        list(extra), bootstrap, done, save)
        for n in space.paired_steps:
            if ("paired", space_name, None, "ddpm", n) not in done:
                save(paired_cells(out / space_name, space_name, models, n, space.paired_images, guidance_scale,
                                  bootstrap))
    plot(records, out / "quality_vs_steps.png")
    result = {"records": records, "settings": settings, "time_s": round(time.time() - t0, 1)}
    atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out / "results.json")
    return result


def study_model(out: Path, space_name: str, space: Space, name: str, guidance_scale: float, bound: tuple,
                extra: list[str], bootstrap: int, done: set, save) -> None:
    """Train one model (unless done), score each of its cells not done yet, then bound it."""
    from pipelines import LDMPipeline

    cfg = model_config(name, out / space_name, space.train_steps, space.preset, [*space.overrides, *extra])
    if ("train", space_name, name, None, None) not in done:
        logger.info("training %s %s (%d steps)", space_name, name, space.train_steps)
        summary = train(cfg)
        save({"space": space_name, "model": name, "train_steps": space.train_steps,
              "train_time_s": summary.get("train_time_s"), "final_loss": summary.get("final_loss")})
    pipe = LDMPipeline.from_pretrained(cfg.run_dir / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    for sampler in space.samplers:
        for n in space.sampling_steps:
            if ("cell", space_name, name, sampler, n) in done:
                continue
            r = evaluate(pipe, "shapes", num_images=space.num_images, num_inference_steps=n,
                         guidance_scale=guidance_scale, scheduler=sampler, seed_offset=200_000, bootstrap=bootstrap)
            save({"space": space_name, "model": name, "sampler": sampler, "steps": n, **{k: r[k] for k in SCORES},
                  "num_images": r["num_images"], **({"bands": r["bands"]} if "bands" in r else {}),
                  "sampling_time_s": r["sampling_time_s"]})
            logger.info("%s %s %s %d: all %.3f FD %.3f", space_name, name, sampler, n, r["all_accuracy"],
                        r["frechet_distance"])
    if ("bound", space_name, name, None, None) not in done:
        save({"space": space_name, **bound_record(pipe, name, *bound)})


def paired_cells(out: Path, space_name: str, models, steps: int, num_images: int, guidance_scale: float,
                 bootstrap: int) -> dict:
    """Every model drawn by ancestral DDPM (its Σ as trained) at ``steps`` steps from the same seeds and prompts,
    scored, and each scored against the first model with a 95 % band on the difference
    (`ldm.eval.scoring.paired_bands`): the noise of which starting noises were drawn, shared by all, cancels."""
    from ldm.diffusion.schedulers import sampling_scheduler
    from ldm.eval.scorers import eval_prompts, score
    from ldm.eval.scoring import distribution_scores, generate_for_prompts, paired_bands
    from pipelines import LDMPipeline

    base = eval_prompts("shapes")
    if num_images < 2 * len(base):
        raise ValueError(f"paired_images must be at least {2 * len(base)} (two per held-out prompt), got {num_images}")
    images, t0 = {}, time.time()
    for name in models:
        pipe = LDMPipeline.from_pretrained(out / name / "pipeline")
        pipe.scheduler = sampling_scheduler(pipe.scheduler, "ddpm")
        prompts, images[name] = generate_for_prompts(pipe, base, -(-num_images // len(base)), 300_000,
                                                     num_inference_steps=steps, guidance_scale=guidance_scale)
    scores = {name: {**score("shapes", images[name], prompts), **distribution_scores("shapes", images[name], prompts)}
              for name in models}
    first = models[0]
    differences = {name: paired_bands("shapes", images[first], images[name], prompts, max(bootstrap, 2))
                   for name in models[1:]}
    for name, d in differences.items():
        logger.info("%s %s - %s at %d ddpm steps: FD %+.4f [%+.4f, %+.4f], all %+.3f", space_name, name, first, steps,
                    d["frechet_distance"]["difference"], d["frechet_distance"]["low"], d["frechet_distance"]["high"],
                    d["all_accuracy"]["difference"])
    return {"space": space_name, "paired_steps": steps, "num_images": len(prompts),
            "against": first, "scores": {n: {k: v[k] for k in SCORES if k in v} for n, v in scores.items()},
            "differences": differences, "sampling_time_s": round(time.time() - t0, 1)}


def bound_record(pipe, name: str, nll_images: int, nll_stride: int, check_images: int) -> dict:
    """One model's likelihood bound on held-out images (strided), and the strided estimate against the full
    T-step bound on the first ``check_images`` of them."""
    t0 = time.time()
    bound = nll(pipe, "shapes", nll_images, nll_stride)
    record = {"model": name, "nll_bpd": bound["nll_bpd"], "nll_bpd_standard_error": bound["nll_bpd_standard_error"],
              "nll_space": bound["space"], "nll_stride": nll_stride, "nll_images": nll_images,
              "prior_bpd": bound["prior_bpd"], "decoder_bpd": bound["decoder_bpd"],
              "nll_passes_per_image": bound["network_passes_per_image"]}
    if check_images:
        full, strided = nll(pipe, "shapes", check_images, 1), nll(pipe, "shapes", check_images, nll_stride)
        record.update(check_images=check_images, check_full_bpd=full["nll_bpd"], check_strided_bpd=strided["nll_bpd"],
                      check_full_standard_error=full["nll_bpd_standard_error"])
    return {**record, "bound_time_s": round(time.time() - t0, 1)}


def rebound(out: Path, nll_images: int = 32, nll_stride: int = 50, check_images: int = 4) -> dict:
    """Bound again the models a finished study left in ``out`` (no training, no sampling): its results.json
    gets new bound records, everything else kept."""
    from pipelines import LDMPipeline

    saved = json.loads((out / "results.json").read_text())
    records = [r for r in saved["records"] if "nll_bpd" not in r]
    for r in [r for r in saved["records"] if "nll_bpd" in r]:
        space = r.get("space", "latent")
        pipe = LDMPipeline.from_pretrained(out / space / r["model"] / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        records.append({"space": space, **bound_record(pipe, r["model"], nll_images, nll_stride, check_images)})
    saved["records"] = records
    saved["settings"].update(nll_images=nll_images, nll_stride=nll_stride, check_images=check_images)
    atomic_save(lambda p: Path(p).write_text(json.dumps(saved, indent=2)), out / "results.json")
    return saved


def plot(records: list[dict], png: Path) -> None:
    """Fréchet distance and all-three accuracy against sampling steps, one row per space, with each cell's
    95 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in records if "sampler" in r]
    spaces = list(dict.fromkeys(r.get("space", "latent") for r in cells)) or ["latent"]
    fig, axes = plt.subplots(len(spaces), 2, figsize=(11, 4 * len(spaces)), dpi=100, squeeze=False)
    for row, space in zip(axes, spaces):
        here = [r for r in cells if r.get("space", "latent") == space]
        for model in dict.fromkeys(r["model"] for r in here):
            for sampler, style in zip(SAMPLERS, ("-o", "--s")):
                rows = sorted((r for r in here if r["model"] == model and r["sampler"] == sampler),
                              key=lambda r: r["steps"])
                for ax, key in zip(row, ("frechet_distance", "all_accuracy")):
                    if rows:
                        ax.errorbar([r["steps"] for r in rows], [r[key] for r in rows], yerr=_band_err(rows, key),
                                    fmt=style, capsize=3, label=f"{model} {sampler}")
        if here:
            row[0].axhline(here[0]["frechet_distance_floor"], color="grey", lw=0.8, label="real-vs-real floor")
        for ax, title in zip(row, ("Fréchet distance (lower is better)", "colour, shape and position all right")):
            ax.set_xscale("log"), ax.set_xlabel("sampling steps"), ax.set_title(f"{space}: {title}")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_save(lambda p: fig.savefig(p, format="png"), png)
    plt.close(fig)


def _band_err(rows: list[dict], key: str):
    if not all("bands" in r for r in rows):
        return None
    return [[max(r[key] - r["bands"][key]["low"], 0) for r in rows], [max(r["bands"][key]["high"] - r[key], 0)
                                                                      for r in rows]]


def _band(r: dict, key: str) -> str:
    b = r.get("bands", {}).get(key)
    return f"±{(b['high'] - b['low']) / 2:.3f}" if b else ""


def format_table(records: list[dict]) -> str:
    """Every cell (with the half-width of its 95 % band), then each model's training and bound."""
    cells = [r for r in records if "sampler" in r]
    lines = [f"{'space':7}{'model':8}{'sampler':8}{'steps':>6}{'colour':>8}{'shape':>7}{'posn':>7}{'all':>14}"
             f"{'FD':>15}{'floor':>7}{'div':>7}"]
    for r in cells:
        lines.append(f"{r.get('space', 'latent'):7}{r['model']:8}{r['sampler']:8}{r['steps']:>6}"
                     f"{r['colour_accuracy']:>8.3f}{r['shape_accuracy']:>7.3f}{r['position_accuracy']:>7.3f}"
                     f"{r['all_accuracy']:>7.3f}{_band(r, 'all_accuracy'):>7}"
                     f"{r['frechet_distance']:>8.3f}{_band(r, 'frechet_distance'):>7}"
                     f"{r['frechet_distance_floor']:>7.3f}{r['diversity']:>7.3f}")
    for r in records:
        if "paired_steps" in r:
            lines.append(format_paired(r))
        elif "nll_bpd" in r:
            check = (f"; on {r['check_images']} images full bound {r['check_full_bpd']:.4f} vs strided "
                     f"{r['check_strided_bpd']:.4f}") if "check_full_bpd" in r else ""
            lines.append(f"{r.get('space', 'latent')} {r['model']}: NLL bound {r['nll_bpd']:.4f} ± "
                         f"{r['nll_bpd_standard_error']:.4f} bits/dim (stride {r['nll_stride']}, {r['nll_images']} "
                         f"images){check}")
        elif "sampler" not in r:
            lines.append(f"{r['space']} {r['model']}: trained {r['train_steps']} steps in {r['train_time_s']} s, "
                         f"final loss {r['final_loss']}")
    return "\n".join(lines)


def format_paired(r: dict) -> str:
    """A paired record: each model's scores, and how far from the first each is, with the 95 % band."""
    against = r["against"]
    parts = [f"{r['space']} paired, {r['num_images']} images at {r['paired_steps']} ddpm steps:"]
    for name, v in r["scores"].items():
        parts.append(f"  {name}: all {v['all_accuracy']:.3f}, FD {v['frechet_distance']:.4f}"
                     f" (floor {v['frechet_distance_floor']:.4f})")
        if name in r["differences"]:
            d = r["differences"][name]
            parts[-1] += "; vs {}: FD {:+.4f} [{:+.4f}, {:+.4f}], all {:+.3f} [{:+.3f}, {:+.3f}]".format(
                against, *(d[k][x] for k in ("frechet_distance", "all_accuracy") for x in ("difference", "low", "high")))
    return "\n".join(parts)


def plan_spaces(plan: str, args) -> dict[str, Space]:
    """The plan's spaces, with whatever the command line sets in place of each space's own."""
    given = {"train_steps": args.steps, "sampling_steps": tuple(args.sampling_steps or ()) or None,
             "num_images": args.num_images, "preset": args.preset}
    spaces = {k: v for k, v in PLANS[plan]["spaces"].items() if not args.spaces or k in args.spaces}
    return {k: dataclasses.replace(v, **{f: x for f, x in given.items() if x is not None}) for k, v in spaces.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/variance-study")
    parser.add_argument("--plan", default="quick", choices=list(PLANS))
    parser.add_argument("--spaces", nargs="+", default=None, choices=["latent", "pixel"],
                        help="the plan's spaces to run (default: all of them)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the plan's)")
    parser.add_argument("--sampling-steps", type=int, nargs="+", default=None)
    parser.add_argument("--num-images", type=int, default=None, help="images per cell (16 held-out prompts)")
    parser.add_argument("--preset", default=None, help="the config every model trains from (default: the plan's)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="the plan's: 1 (unguided, as Improved DDPM's comparisons) for quick, the demo's 1.5 for full")
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples for each cell's 95%% band")
    parser.add_argument("--nll-images", type=int, default=32)
    parser.add_argument("--nll-stride", type=int, default=50)
    parser.add_argument("--check-images", type=int, default=4, help="images for the full-bound check (0: skip)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
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
        guidance = args.guidance_scale if args.guidance_scale is not None else PLANS[args.plan]["guidance_scale"]
        result = run_study(Path(args.out), plan_spaces(args.plan, args), guidance, args.nll_images, args.nll_stride,
                           args.check_images, tuple(args.models), args.overrides, args.bootstrap)
        print(format_table(result["records"]))
        print(f"wrote {args.out}/results.json and {args.out}/quality_vs_steps.png ({result['time_s']:.0f} s)")


if __name__ == "__main__":
    main()
