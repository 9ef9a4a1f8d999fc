"""A scored fine-tuning demonstration: teach the built-in shapes model a colour (orange, teal) or a shape
(star) it has never seen, with LoRA or with textual inversion.

    python -m demos.lora_demo --base runs/demo/pipeline --out runs/lora-orange
    python -m demos.lora_demo --base runs/demo/pipeline --concept star --out runs/lora-star
    python -m demos.lora_demo --method textual_inversion --out runs/ti-orange

1. Draw 32 images of the new concept ("an orange circle at the center", "a red star at the top left") for
   all but 3 of its pairs ((shape, position) for a colour, (colour, position) for a shape); those 3 pairs
   are kept for evaluation.
2. Train LoRA adapters on the base model with ``configs/ldm/lora-orange.yaml``. Prior preservation
   (DreamBooth's loss) trains on the base model's own drawings of its training prompts alongside, so
   that it keeps what it knew.
3. Score from pixels with the built-in scorer (extended by the new colours and shapes): how often the base
   model and the adapted one draw the concept for the 3 held-out prompts, and both models' scores on the
   base model's own held-out prompts (forgetting).

With ``--method textual_inversion`` (``configs/ldm/ti-orange.yaml``) the captions name the concept with a
placeholder token (``<orange>``) whose embedding is the only thing learnt; there is no prior preservation
(nothing the model knew changes: its weights and old embeddings stay bit for bit), and the base model is
scored on the same prompts with the plain word.

Writes ``metrics.json`` and one grid per evaluation into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from ldm.data.builtin import (
    COLOURS,
    NEW_COLOURS,
    NEW_SHAPES,
    POSITIONS,
    SHAPES,
    SIZES,
    draw_shape,
    shapes_caption,
    shapes_combos,
    shapes_eval_prompts,
    shapes_heldout_combos,
    write_folder,
)
from ldm.engine.errors import user_errors
from ldm.engine.records import make_grid
from ldm.eval.scorers import score_shapes
from pipelines.files import atomic_save

logger = logging.getLogger(__name__)

CONCEPTS = (*NEW_COLOURS, *NEW_SHAPES)
NUM_HELDOUT_PAIRS = 3


def concept_kind(concept: str) -> str:
    """"colour" or "shape": which word of a caption the concept is."""
    if concept in NEW_COLOURS:
        return "colour"
    if concept in NEW_SHAPES:
        return "shape"
    raise ValueError(f"unknown concept {concept!r}; valid: {CONCEPTS}")


def concept_caption(concept: str, pair: tuple[str, str]) -> str:
    """The caption of the concept with one of its pairs: (shape, position) for a colour, else (colour, position)."""
    other, position = pair
    if concept_kind(concept) == "colour":
        return shapes_caption(concept, other, position)
    return shapes_caption(other, concept, position)


def concept_pairs(concept: str, seed: int = 7) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training, held-out) pairs of the concept: (shape, position) for a colour, (colour, position) for a
    shape."""
    others = SHAPES if concept_kind(concept) == "colour" else tuple(COLOURS)
    pairs = [(o, p) for o in others for p in POSITIONS]
    held = set(np.random.default_rng(seed).choice(len(pairs), NUM_HELDOUT_PAIRS, replace=False).tolist())
    return [x for i, x in enumerate(pairs) if i not in held], [x for i, x in enumerate(pairs) if i in held]


def generate_concept(out_dir: str | Path, concept: str, num_images: int = 32, seed: int = 0,
                     word: str | None = None) -> Path:
    """At most 32 images of the concept, cycling over its training pairs with random sizes and jitter; the
    captions call it ``word`` (default: its name)."""
    if not 1 <= num_images <= 32:
        raise ValueError(f"num_images={num_images}: the demonstration uses between 1 and 32 images")
    train_pairs, _ = concept_pairs(concept)
    rng = np.random.default_rng(seed)
    records, images = [], []
    for i in range(num_images):
        pair = train_pairs[i % len(train_pairs)]
        caption = concept_caption(concept, pair)
        words = caption.split(" at the ")[0].split()
        size, jitter = float(rng.choice(SIZES)), tuple(rng.uniform(-0.04, 0.04, size=2))
        images.append(draw_shape(words[1], words[2], pair[1], size, jitter))
        records.append({"file_name": f"{i:05d}.png", "text": name_concept(caption, concept, word)})
    out_dir = Path(out_dir)
    write_folder(out_dir, records, images, {"name": concept, "num_images": num_images, "seed": seed})
    return out_dir


def name_concept(caption: str, concept: str, word: str | None) -> str:
    """The caption with the concept's word replaced by ``word`` (a placeholder token), when given."""
    return caption if word is None else " ".join(word if w == concept else w for w in caption.split())


def prior_prompts(n: int = 32, seed: int = 0) -> list[str]:
    """A fixed sample of the base model's training prompts, for prior preservation."""
    heldout = set(shapes_heldout_combos())
    combos = [c for c in shapes_combos() if c not in heldout]
    idx = np.random.default_rng(seed).choice(len(combos), n, replace=False)
    return [shapes_caption(*combos[i]) for i in sorted(idx)]


def demo_config(config: str, base: str, data: Path, run_dir: Path, prior: Path | None, overrides=()):
    """The fine-tuning config of a demonstration: ``config`` on the ``base`` pipeline and the generated
    ``data``, run in ``run_dir``; with ``prior``, DreamBooth's prior preservation on the base model's drawings
    of its own training prompts, kept in that folder."""
    from ldm.engine.config import load_config
    from ldm.trainer.config import LDMConfig

    cfg = load_config(LDMConfig, config, [
        f"model.pretrained={base}", f"data.dataset={data}", f"output_dir={run_dir.parent}", f"name={run_dir.name}",
        *([f"dreambooth.class_data={prior}"] if prior else []), *overrides])
    if prior and not cfg.dreambooth.class_prompts and not cfg.dreambooth.class_prompt:
        cfg.dreambooth.class_prompts = prior_prompts()
    return cfg


def evaluate_prompts(pipe, prompts: list[str], per_prompt: int, out_png: Path, with_new: bool,
                     meant: list[str] | None = None) -> tuple[dict, list]:
    """Draw ``per_prompt`` images of each prompt (a grid of them in ``out_png``) and score them against
    ``meant`` (the same prompts with the concept's plain word, when the prompts name it by a placeholder
    token); return (scores, images)."""
    from ldm.eval.scoring import generate_for_prompts

    all_prompts, images = generate_for_prompts(pipe, prompts, per_prompt, num_inference_steps=50,
                                               guidance_scale=3.0)
    grid = make_grid(images, ncols=per_prompt)
    atomic_save(lambda p: grid.save(p, format="PNG"), out_png)
    if meant is not None:
        all_prompts = [m for m in meant for _ in range(per_prompt)]
    scores = score_shapes(images, all_prompts, with_new=with_new)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}, images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="runs/demo/pipeline", help="the shapes pipeline to adapt")
    parser.add_argument("--concept", default="orange", choices=CONCEPTS, help="the colour or shape to teach")
    parser.add_argument("--method", default="lora", choices=("lora", "textual_inversion"))
    parser.add_argument("--out", default=None, help="default: runs/lora-<concept> (runs/ti-<concept>)")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--config", default=None,
                        help="default: configs/ldm/lora-orange.yaml (configs/ldm/ti-orange.yaml)")
    parser.add_argument("--per-prompt", type=int, default=16, help="images per held-out prompt of the concept")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the LoRA config")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        run(args)


def run(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ldm.engine.config import load_config
    from ldm.methods.lora import LORA_FILE
    from ldm.methods.textual_inversion import EMBEDS_FILE
    from ldm.trainer.config import LDMConfig
    from ldm.trainer.train import train
    from pipelines import LDMPipeline

    concept, kind, ti = args.concept, concept_kind(args.concept), args.method == "textual_inversion"
    out = Path(args.out or f"runs/{'ti' if ti else 'lora'}-{concept}")
    if not (Path(args.base) / "model_index.json").is_file():
        raise FileNotFoundError(f"--base {args.base!r} is not a pipeline folder; run `make demo` first")
    config = args.config or f"configs/ldm/{'ti' if ti else 'lora'}-orange.yaml"
    placeholder = None
    if ti:
        placeholder = load_config(LDMConfig, config, list(args.overrides)).finetune.placeholder_token
    data = generate_concept(out / "data", concept, args.num_images, word=placeholder)
    cfg = demo_config(config, args.base, data, out, prior=None if ti else out / "prior_images",
                      overrides=args.overrides)
    train(cfg)

    _, held = concept_pairs(concept)
    new_prompts = [concept_caption(concept, pair) for pair in held]
    base = LDMPipeline.from_pretrained(args.base)
    adapted = LDMPipeline.from_pretrained(args.base)
    if ti:
        adapted.load_textual_inversion(str(cfg.run_dir / "textual_inversion" / EMBEDS_FILE))
        weights = cfg.run_dir / "textual_inversion" / EMBEDS_FILE
    else:
        adapted.load_lora_weights(str(cfg.run_dir / "lora"), weight_name=LORA_FILE)
        weights = cfg.run_dir / "lora" / LORA_FILE
    name = "ti" if ti else "lora"
    result = {"base": args.base, "concept": concept, "method": args.method, name: str(weights),
              "training_images": args.num_images,
              "heldout_new_prompts": new_prompts, "images_per_new_prompt": args.per_prompt,
              "original_prompts": shapes_eval_prompts(), "images_per_original_prompt": 6}
    if ti:
        result["placeholder_prompts"] = [name_concept(p, concept, placeholder) for p in new_prompts]
    for who, pipe in (("base", base), (name, adapted)):
        prompts = result["placeholder_prompts"] if who == "ti" else new_prompts
        result[f"{who}_on_new_prompts"], _ = evaluate_prompts(pipe, prompts, args.per_prompt,
                                                              out / f"{who}_new_prompts.png", with_new=True,
                                                              meant=new_prompts)
        if not ti:  # textual inversion changes nothing the original prompts use
            result[f"{who}_on_original_prompts"], _ = evaluate_prompts(pipe, shapes_eval_prompts(), 6,
                                                                       out / f"{who}_original_prompts.png",
                                                                       with_new=False)
    atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), out / "metrics.json")
    other = "shape" if kind == "colour" else "colour"
    rows = [(f"{concept} drawn (held-out {concept} prompts)", "new", f"{kind}_accuracy"),
            (f"{other} right (held-out {concept} prompts)", "new", f"{other}_accuracy"),
            (f"position right (held-out {concept} prompts)", "new", "position_accuracy")]
    if not ti:
        rows += [("colour right (original held-out prompts)", "original", "colour_accuracy"),
                 ("shape right (original held-out prompts)", "original", "shape_accuracy")]
    print(f"{'':<44}{'base':>8}{'TI' if ti else 'LoRA':>8}")
    for label, which, key in rows:
        print(f"{label:<44}{result[f'base_on_{which}_prompts'][key]:>8.3f}"
              f"{result[f'{name}_on_{which}_prompts'][key]:>8.3f}")
    print(f"wrote {out / 'metrics.json'} and grids in {out}")


if __name__ == "__main__":
    main()
