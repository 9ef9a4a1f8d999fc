"""A scored masked-loss demonstration: teach the shapes model a new colour (orange) from images whose
background is noise, with and without a mask of the shape.

    python -m demos.mask_demo --base runs/demo/pipeline --out runs/mask-demo

1. Draw 32 images of orange shapes (the LoRA demonstration's training pairs) over random colour noise, and beside
   each a ``<name>_mask.png`` covering the shape (its anti-aliased coverage, grown by one pixel).
2. Train LoRA adapters on the base model twice with ``configs/ldm/lora-orange.yaml`` and the same budget and
   seed: once on every pixel, once with ``data.mask_source=file`` (the background weighs nothing).
3. Score from pixels on the 3 held-out orange prompts: how often each model draws orange and the right shape,
   and how much background it draws: the mean brightness of the image's outer two-pixel ring (black in the
   base model's drawings; about 0.4 in the training images' noise).
4. Without training, decode what the masked loss trains towards (`masked_targets`): the noisy images' latents
   under the mask, the clean ones elsewhere. At this size a shape's latent pixels straddle its edge, so this
   bounds what the masked model can learn.

Writes ``metrics.json`` and ``grid.png`` (rows: training images, base, every pixel, masked) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from demos.lora_demo import concept_caption, concept_pairs, demo_config, evaluate_prompts
from ldm.data.builtin import NEW_COLOURS, SIZES, draw_shape, write_folder
from ldm.data.masks import mask_path
from ldm.engine.errors import user_errors
from ldm.engine.records import make_grid
from pipelines.files import atomic_save

logger = logging.getLogger(__name__)

NOISE_MAX = 140  # background noise: uniform in [0, NOISE_MAX] per channel and pixel
RING = 2  # pixels of the border read as background


def noisy_concept_draws(concept: str = "orange", num_images: int = 32, seed: int = 0):
    """(caption, the shape on black, the shape over colour noise, its mask) of each training image, as uint8
    images."""
    train_pairs, _ = concept_pairs(concept)
    rng = np.random.default_rng(seed)
    colour = np.array(NEW_COLOURS[concept], dtype=np.float32)
    draws = []
    for i in range(num_images):
        caption = concept_caption(concept, train_pairs[i % len(train_pairs)])
        words = caption.split(" at the ")[0].split()
        clean = draw_shape(words[1], words[2], train_pairs[i % len(train_pairs)][1], float(rng.choice(SIZES)),
                           tuple(rng.uniform(-0.04, 0.04, size=2)))
        drawn = np.asarray(clean, np.float32)
        coverage = drawn.max(-1, keepdims=True) / colour.max()  # anti-aliased: 1 inside, 0 outside
        noise = rng.uniform(0, NOISE_MAX, drawn.shape).astype(np.float32)
        noisy = Image.fromarray(np.clip(coverage * colour + (1 - coverage) * noise, 0, 255).round().astype(np.uint8))
        mask = Image.fromarray(((coverage[..., 0] > 0) * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))
        draws.append((caption, clean, noisy, mask))
    return draws


def noisy_concept_data(out_dir: str | Path, concept: str = "orange", num_images: int = 32, seed: int = 0) -> Path:
    """The concept's training images over colour noise, each with a ``_mask.png`` of its shape."""
    draws = noisy_concept_draws(concept, num_images, seed)
    records = [{"file_name": f"{i:05d}.png", "text": caption} for i, (caption, *_) in enumerate(draws)]
    out_dir = Path(out_dir)
    write_folder(out_dir, records, [noisy for _, _, noisy, _ in draws],
                  {"name": f"{concept}-noisy", "num_images": num_images, "seed": seed})
    for rec, (*_, mask) in zip(records, draws):
        mask.save(mask_path(out_dir / rec["file_name"]))
    return out_dir


def masked_targets(vae, concept: str = "orange", num_images: int = 32, seed: int = 0) -> dict:
    """What the masked loss can teach at this latent size, without training: the noisy images' latents where
    the area-averaged mask weighs anything, the same shapes' latents on black elsewhere (the masked loss's
    targets in a black surrounding), decoded and read off the pixels, beside the clean latents decoded."""
    import torch

    from ldm.data.images import downsample
    from ldm.eval.scorers import read_shape
    from ldm.models.vae import encode
    from pipelines.latents import vae_scale_factor

    draws = noisy_concept_draws(concept, num_images, seed)

    def pixels(images):
        return torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1

    with torch.no_grad():
        clean, _ = encode(vae, pixels([d[1] for d in draws]))
        noisy, _ = encode(vae, pixels([d[2] for d in draws]))
        weight = downsample(torch.from_numpy(np.stack([np.asarray(d[3], np.float32) / 255 for d in draws]))[:, None],
                            vae_scale_factor(vae))
        out = {"latent_pixels_masked_in": round(float((weight > 0).float().mean()), 4),
               "of_which_wholly_inside": round(float((weight >= 0.999).sum() / (weight > 0).sum()), 4)}
        for name, z in (("clean", clean), ("masked_targets", torch.where(weight > 0, noisy, clean))):
            x = ((vae.decode(z).sample.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
            read = [read_shape(Image.fromarray(a), with_new=True) for a in x]
            inside = np.concatenate([a[np.asarray(d[1]).max(-1) > 0.9 * max(NEW_COLOURS[concept])]
                                     for a, d in zip(x, draws)])
            out[name] = {"colour_read": round(float(np.mean([r["colour"] == concept for r in read])), 4),
                         "shape_read": round(float(np.mean([r["shape"] == d[0].split()[2] for r, d in zip(read, draws)])), 4),
                         "mean_rgb_inside": [round(float(v), 1) for v in inside.reshape(-1, 3).mean(0)]}
    return out


def background_level(images) -> float:
    """Mean brightness (max over channels, in [0, 1]) of the outer ``RING`` pixels of every image."""
    values = []
    for img in images:
        a = np.asarray(img.convert("RGB"), np.float32).max(-1) / 255
        ring = np.ones_like(a, dtype=bool)
        ring[RING:-RING, RING:-RING] = False
        values.append(float(a[ring].mean()))
    return round(float(np.mean(values)), 4)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="runs/demo/pipeline", help="the shapes pipeline to adapt")
    parser.add_argument("--out", default="runs/mask-demo")
    parser.add_argument("--config", default="configs/ldm/lora-orange.yaml")
    parser.add_argument("--per-prompt", type=int, default=16, help="images per held-out prompt")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of both trainings")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        run(args)


def run(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ldm.methods.lora import LORA_FILE
    from ldm.trainer.train import train
    from pipelines import LDMPipeline

    out = Path(args.out)
    if not (Path(args.base) / "model_index.json").is_file():
        raise FileNotFoundError(f"--base {args.base!r} is not a pipeline folder; run `make demo` first")
    data = noisy_concept_data(out / "data")
    train_images = [Image.open(p).convert("RGB") for p in sorted(data.glob("0*.png")) if "_mask" not in p.name]
    _, held = concept_pairs("orange")
    prompts = [concept_caption("orange", pair) for pair in held]
    pipes = {"base": LDMPipeline.from_pretrained(args.base)}
    result = {"base": args.base, "training_images": len(train_images), "heldout_prompts": prompts,
              "images_per_prompt": args.per_prompt,
              "training_background_level": background_level(train_images),
              "masked_targets_check": masked_targets(pipes["base"].vae)}
    for name, extra in (("every_pixel", []), ("masked", ["data.mask_source=file"])):
        cfg = demo_config(args.config, args.base, data, out / name, out / "prior_images", [*extra, *args.overrides])
        result[f"{name}_train"] = train(cfg)
        pipes[name] = LDMPipeline.from_pretrained(args.base)
        pipes[name].load_lora_weights(str(cfg.run_dir / "lora"), weight_name=LORA_FILE)
    rows = [train_images[:8]]
    for name, pipe in pipes.items():
        scores, images = evaluate_prompts(pipe, prompts, args.per_prompt, out / f"{name}.png", with_new=True)
        scores["background_level"] = background_level(images)
        result[name] = scores
        rows.append(images[:: max(1, len(images) // 8)][:8])
    grid = make_grid([img for row in rows for img in row], ncols=8)
    atomic_save(lambda p: grid.save(p, format="PNG"), out / "grid.png")
    atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out / "metrics.json")
    print(f"{'held-out orange prompts':<28}{'base':>8}{'every px':>10}{'masked':>8}")
    for label, key in (("orange drawn", "colour_accuracy"), ("shape right", "shape_accuracy"),
                       ("background level", "background_level")):
        print(f"{label:<28}" + "".join(f"{result[n][key]:>{w}.3f}" for n, w in
                                       (("base", 8), ("every_pixel", 10), ("masked", 8))))
    check = result["masked_targets_check"]
    print(f"the masked loss's targets, decoded in a black surrounding: orange read "
          f"{check['masked_targets']['colour_read']:.3f}, shape read {check['masked_targets']['shape_read']:.3f} "
          f"(clean latents {check['clean']['colour_read']:.3f}, {check['clean']['shape_read']:.3f})")
    print(f"(training images' background level {result['training_background_level']:.3f}); wrote "
          f"{out / 'metrics.json'} and {out / 'grid.png'}")


if __name__ == "__main__":
    main()
