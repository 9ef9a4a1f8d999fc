"""Write a pipeline folder in another format.

    python -m ldm.export single-file --pipeline runs/demo/pipeline --out demo.safetensors [--dtype fp16]

one ``.safetensors`` file in Stable Diffusion's original layout, or Stable Diffusion XL's for an SDXL pipeline
(AUTOMATIC1111, ComfyUI, diffusers' ``from_single_file``), with ``demo.config/`` beside it
(`pipelines.single_file`)."""

from __future__ import annotations

from pathlib import Path


def load_for_export(folder: str | Path):
    """The pipeline of ``folder``: an LDMPipeline, or a SuperResolutionPipeline for a super-resolution stage's."""
    import json

    from pipelines import LDMPipeline, SuperResolutionPipeline

    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"--pipeline {str(folder)!r} is not a pipeline folder (no model_index.json)")
    sr = "low_res_scheduler" in json.loads(index.read_text(encoding="utf-8"))
    return (SuperResolutionPipeline if sr else LDMPipeline).from_pretrained(folder)


def single_file_modelspec(pipe, title: str) -> dict[str, str]:
    """The ``modelspec.*`` entries of a single file of ``pipe`` (`pipelines.modelspec`)."""
    from pipelines.latents import vae_scale_factor
    from pipelines.modelspec import modelspec

    if pipe.vae is None:  # pixel space: the single-file layout refuses it, with its reason
        return {}
    return modelspec(pipe.unet.config, pipe.scheduler.config, vae_scale_factor(pipe.vae), title)


def main(argv=None) -> None:
    """``python -m ldm.export single-file --pipeline runs/demo/pipeline --out demo.safetensors [--dtype fp16]``:
    one .safetensors file in Stable Diffusion's (or SDXL's) original layout (AUTOMATIC1111, ComfyUI, diffusers'
    ``from_single_file``), with ``demo.config/`` beside it (`pipelines.single_file`); prints how diffusers
    loads it."""
    import argparse
    import logging

    from ldm.engine.errors import user_errors

    parser = argparse.ArgumentParser(prog="python -m ldm.export",
                                     description="Export a pipeline folder in another format.")
    commands = parser.add_subparsers(dest="command", required=True)
    single = commands.add_parser("single-file", help="one .safetensors file in Stable Diffusion's (or SDXL's) "
                                                     "original layout")
    single.add_argument("--pipeline", required=True, help="a pipeline folder (runs/<name>/pipeline)")
    single.add_argument("--out", required=True, help="the file to write, ending in .safetensors")
    single.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                        help="store the weights in this precision (default: as they are)")
    single.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        from pipelines.single_file import config_dir, to_single_file

        logging.basicConfig(level=logging.INFO)
        pipe = load_for_export(args.pipeline)
        out = to_single_file(pipe, args.out, args.dtype, single_file_modelspec(pipe, Path(args.out).stem))
        loader = getattr(pipe, "saved_class_name", "StableDiffusionPipeline")
        print(f"wrote {out} and its config folder {config_dir(out)} (diffusers: {loader}."
              f"from_single_file({str(out)!r}, config={str(config_dir(out))!r}, local_files_only=True))")


if __name__ == "__main__":
    main()
