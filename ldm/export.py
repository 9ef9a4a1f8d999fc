"""What a diffusion run leaves behind: the pipeline folder (EMA weights when EMA is on), under LoRA the
adapters alone and, when asked, a pipeline with them merged in, under textual inversion the new embeddings.
Main process only; every folder is written beside its target and swapped in when complete. ``python -m
ldm.export single-file`` writes a pipeline folder as one file in Stable Diffusion's original layout."""

from __future__ import annotations

from pathlib import Path

from .lora import lora_file, merge_into, save_lora
from .models import make_pipeline, pretrained_folder
from .run import atomic_save_dir
from .schedulers import sampling_scheduler


def export(cfg, comp, unet, text_encoder, run_dir: Path) -> dict[str, Path]:
    """Write the run's model(s) from the unwrapped ``unet`` and ``text_encoder``; return {what: path}."""
    saved = {}
    fc = cfg.finetune
    if fc.method == "textual_inversion":
        from .textual_inversion import EMBEDS_FILE, learned_embeddings, save_embeddings

        vectors = learned_embeddings(text_encoder, comp.tokenizer, fc)
        atomic_save_dir(lambda d: save_embeddings(d, fc.placeholder_token, vectors), run_dir / "textual_inversion")
        saved["textual_inversion"] = run_dir / "textual_inversion" / EMBEDS_FILE
    elif cfg.finetune.method == "lora":
        atomic_save_dir(lambda d: save_lora(d, unet, text_encoder, cfg.finetune.lora_format), run_dir / "lora")
        saved["lora"] = lora_file(run_dir / "lora")
        if cfg.finetune.merged_export:
            from pipelines import LDMPipeline

            merged = merge_into(LDMPipeline.from_pretrained(pretrained_folder(cfg)), run_dir / "lora",
                                cfg.finetune.merge_scale)
            merged.scheduler = sampling_scheduler(comp.scheduler, cfg.sample.scheduler)
            atomic_save_dir(lambda d: merged.save_pretrained(d, safe_serialization=True), run_dir / "pipeline")
            saved["pipeline"] = run_dir / "pipeline"
    else:
        pipe = make_pipeline(comp, unet.eval(), text_encoder.eval(), cfg.sample.scheduler)
        if comp.upscale_factor is not None and pipe.vae is not None:
            # diffusers' upscaler decodes with its fixed factor: carry the VAE with its latent space rescaled to it
            # (an exact reparametrisation: the same scaled latents, the same images).
            from pipelines import rescale_latent_space

            pipe.register_modules(vae=rescale_latent_space(pipe.vae))
        atomic_save_dir(lambda d: pipe.save_pretrained(d, safe_serialization=True), run_dir / "pipeline")
        saved["pipeline"] = run_dir / "pipeline"
    return saved


def load_for_export(folder: str | Path):
    """The pipeline of ``folder``: an LDMPipeline, or a SuperResolutionPipeline for a super-resolution stage's."""
    import json

    from pipelines import LDMPipeline, SuperResolutionPipeline

    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"--pipeline {str(folder)!r} is not a pipeline folder (no model_index.json)")
    sr = "low_res_scheduler" in json.loads(index.read_text(encoding="utf-8"))
    return (SuperResolutionPipeline if sr else LDMPipeline).from_pretrained(folder)


def main(argv=None) -> None:
    """``python -m ldm.export single-file --pipeline runs/demo/pipeline --out demo.safetensors [--dtype fp16]``:
    one .safetensors file in Stable Diffusion's original layout (AUTOMATIC1111, ComfyUI, diffusers'
    ``from_single_file``), with ``demo.config/`` beside it (`pipelines.single_file`)."""
    import argparse
    import logging

    from .errors import user_errors

    parser = argparse.ArgumentParser(prog="python -m ldm.export",
                                     description="Export a pipeline folder in another format.")
    commands = parser.add_subparsers(dest="command", required=True)
    single = commands.add_parser("single-file", help="one .safetensors file in Stable Diffusion's original layout")
    single.add_argument("--pipeline", required=True, help="a pipeline folder (runs/<name>/pipeline)")
    single.add_argument("--out", required=True, help="the file to write, ending in .safetensors")
    single.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                        help="store the weights in this precision (default: as they are)")
    single.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        from pipelines.single_file import config_dir, to_single_file

        logging.basicConfig(level=logging.INFO)
        out = to_single_file(load_for_export(args.pipeline), args.out, args.dtype)
        print(f"wrote {out} and its config folder {config_dir(out)} (diffusers: StableDiffusionPipeline."
              f"from_single_file({str(out)!r}, config={str(config_dir(out))!r}, local_files_only=True))")


if __name__ == "__main__":
    main()
