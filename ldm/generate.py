"""Draw images from a pipeline folder or single file, optionally with LoRA adapters or textual-inversion
embeddings, from the command line.

    python -m ldm.generate --pipeline runs/demo/pipeline "a blue triangle at the top right" --out out.png
    python -m ldm.generate --pipeline /path/to/sd15 --lora runs/dreambooth-sd15/lora \
        "a photo of sks dog on the beach" --num-images 4 --out dog.png
    python -m ldm.generate --pipeline runs/cascade-demo/cascade "a red circle at the top left" --noise-level 100
    python -m ldm.generate --pipeline demo.safetensors --embedding runs/ti-orange/textual_inversion \
        "an <orange> circle at the center"

    python -m ldm.generate --pipeline runs/demo/pipeline "a blue circle at the top left" --image in.png \
        --strength 0.6                                  # image-to-image
    python -m ldm.generate --pipeline runs/demo/pipeline "a blue circle at the top left" --image in.png \
        --mask mask.png                                 # inpainting: white pixels of the mask drawn anew

A cascade folder (base + super-resolution stages, `pipelines.CascadePipeline`) draws at the last stage's size;
``--steps``, ``--guidance-scale`` and ``--scheduler`` are its base's, ``--noise-level`` its stages'.

Writes one grid PNG (one row per prompt) and each image beside it as ``<out stem>-<i>.png``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ldm.diffusion.schedulers import SAMPLERS, VARIANCES, sampling_scheduler, with_variance
from ldm.engine.errors import user_errors
from ldm.engine.records import make_grid
from ldm.methods.lora import load_lora_checked, lora_file
from ldm.methods.textual_inversion import EMBEDS_FILE, embedding_file, load_embedding
from pipelines import CascadePipeline
from pipelines.files import atomic_save
from pipelines.local import check_safetensors

logger = logging.getLogger(__name__)


def check_out(out: str) -> None:
    """Refuse an ``--out`` that could not be written: not a .png, or in a folder this user cannot write."""
    import os

    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out!r} must end in .png (the grid is a PNG, its images are written beside it)")
    folder = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise PermissionError(f"--out {out!r}: {str(folder)!r} is not a folder this user can write")


def load_pipeline(pipeline: str, lora: str | None = None, scheduler: str | None = "ddpm", variance: str | None = None,
                  embeddings: list[str] = (), lora_scale: float = 1.0):
    """An LDMPipeline from a folder or a single ``.safetensors`` file (`pipelines.single_file`), or a
    `CascadePipeline` from a cascade folder (one with cascade.json), with the adapters of ``lora`` (a folder or
    a .safetensors file) and the textual-inversion ``embeddings`` (folders or files) on the (base) text-to-image
    model, sampling it with ``scheduler`` and, for a learned-variance model, ``variance`` (`with_variance`). A LoHa or
    LoKr file (peft's layout) is merged in at ``lora_scale``; LoRA and DoRA adapters are scaled when drawing."""
    from pipelines import CascadePipeline, LDMPipeline
    from pipelines.cascade import CASCADE_FILE

    cascade = None
    if (Path(pipeline) / CASCADE_FILE).is_file():
        cascade = CascadePipeline.from_pretrained(pipeline)
        pipe = cascade.base
    elif Path(pipeline).is_file():
        pipe = LDMPipeline.from_single_file(pipeline)
    else:
        pipe = LDMPipeline.from_pretrained(pipeline)
    if scheduler is not None:  # None: the one saved in the folder
        pipe.scheduler = sampling_scheduler(pipe.scheduler, scheduler)
    pipe.scheduler = with_variance(pipe.scheduler, variance)
    if lora:
        add_lora(pipe, lora, lora_scale)
    for embedding in embeddings:
        add_embedding(pipe, embedding)
    pipe = cascade or pipe
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    return pipe


def add_lora(pipe, lora: str, lora_scale: float = 1.0) -> None:
    """The adapters of ``lora`` (a run's lora/ folder or a .safetensors file) on ``pipe``: a LoHa or LoKr file
    (peft's layout) merged in at ``lora_scale``, LoRA and DoRA loaded (scaled when drawing)."""
    from ldm.methods.lycoris import merge_adapters, peft_layout_configs

    path = Path(lora)
    if not path.exists():
        raise FileNotFoundError(f"--lora {lora!r} does not exist")
    file = lora_file(path) if path.is_dir() else path
    if file.suffix != ".safetensors":
        raise ValueError(f"--lora {lora!r} is not a .safetensors file: adapter files are read as safetensors only "
                         f"(a .bin/.pt/.ckpt is a pickle, which could run code when loaded)")
    if file.is_file():
        check_safetensors(file, "--lora")
    if file.is_file() and peft_layout_configs(file) is not None:
        merge_adapters(pipe, file, lora_scale)
    elif path.is_dir():  # a run's lora/ folder: diffusers' layout, else kohya's
        load_lora_checked(pipe, path, lora_file(path).name)
    elif path.is_file():
        load_lora_checked(pipe, path.parent, path.name)
    else:
        raise FileNotFoundError(f"--lora {lora!r} does not exist")


def add_embedding(pipe, embedding: str) -> None:
    """The textual-inversion embedding of ``embedding`` (a run's textual_inversion/ folder or a .safetensors file)."""
    path = Path(embedding)
    if path.is_dir():  # a run's textual_inversion/ folder
        path = embedding_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"--embedding {embedding!r} is neither a textual_inversion folder holding "
                                f"{EMBEDS_FILE} (or an SDXL embedding) nor a file")
    if path.suffix != ".safetensors":
        raise ValueError(f"--embedding {embedding!r} is not a .safetensors file: embeddings are read as safetensors "
                         f"only (a .bin/.pt is a pickle, which could run code when loaded)")
    check_safetensors(path, "--embedding")
    load_embedding(pipe, path)


def _read_input(read, path: str, flag: str):
    """``read(path)``, its failure (no such file, not an image, a decompression bomb) one message naming the flag
    and the file."""
    from PIL import Image

    try:
        return read(path)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{flag} {path!r} cannot be read as an image ({getattr(e, 'strerror', None) or e})") from None


def from_image(pipe, args) -> tuple:
    """The image-to-image or inpainting pipeline sharing ``pipe``'s components, and its call arguments."""
    from ldm.data.images import open_image, open_mask
    from pipelines import CascadePipeline, LDMImg2ImgPipeline, LDMInpaintPipeline

    if isinstance(pipe, CascadePipeline):
        raise ValueError("--image is for text-to-image pipelines, not cascades")
    image = _read_input(open_image, args.image, "--image")  # as training reads images: 16-bit, transparency
    if args.mask:
        extra = {"image": image, "mask_image": _read_input(open_mask, args.mask, "--mask"),
                 "strength": 1.0 if args.strength is None else args.strength}
        return LDMInpaintPipeline.from_pipe(pipe), extra
    extra = {"image": image, "strength": 0.8 if args.strength is None else args.strength}
    return LDMImg2ImgPipeline.from_pipe(pipe), extra


FALLBACK = {"num_inference_steps": 50, "guidance_scale": 3.0}  # for a folder without sampling.json


def png_info(settings: dict):
    """The PNG text chunks of an image drawn with ``settings``: AUTOMATIC1111's ``parameters`` and the JSON."""
    import json

    from PIL import PngImagePlugin

    from ldm.engine.records import png_parameters

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", png_parameters(settings))
    info.add_text("settings", json.dumps(settings))
    return info


def sampling_settings(args) -> dict:
    """What to sample with: each setting the command line gives, else the one the run recorded beside its export
    (the pipeline's sampling.json, then the LoRA's: `ldm.methods.base.write_sampling`), else `FALLBACK`; the
    scheduler and size stay the pipeline's own unless given or recorded."""
    from ldm.methods.base import read_sampling

    recorded = {**read_sampling(args.pipeline), **(read_sampling(args.lora) if args.lora else {})}
    given = {"scheduler": args.scheduler, "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
             "height": args.height, "width": args.width}
    return {k: v for k, v in ({**FALLBACK, **recorded, **{k: v for k, v in given.items() if v is not None}}).items()
            if v is not None}


def draw_prompts(pipe, args, settings: dict, kwargs: dict) -> tuple[list, list]:
    """``args.num_images`` images of each prompt (seeds ``args.seed``, +1, ...) with ``settings``, and the PNG text
    of each."""
    draw = {k: settings[k] for k in ("num_inference_steps", "guidance_scale", "height", "width") if k in settings}
    if args.image:  # the input image sets the size
        draw.pop("height", None)
        draw.pop("width", None)
    images, infos = [], []
    for prompt in args.prompts:
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
        images += pipe([prompt] * args.num_images, generator=gens, guidance_rescale=args.guidance_rescale,
                       **draw, **kwargs).images
        infos += [png_info({"prompt": prompt, **settings, "seed": args.seed + i, "pipeline": args.pipeline,
                            **({"lora": args.lora, "lora_scale": args.lora_scale} if args.lora else {})})
                  for i in range(args.num_images)]
    return images, infos


def save_drawn(out: Path, images: list, infos: list, ncols: int) -> Path:
    """The grid at ``out`` and each image beside it as ``<stem>-<i>.png`` with its settings in its text."""
    grid = make_grid(images, ncols=ncols)
    atomic_save(lambda p: grid.save(p, format="PNG"), out)
    for i, (image, info) in enumerate(zip(images, infos)):
        atomic_save(lambda p, im=image, pi=info: im.save(p, format="PNG", pnginfo=pi), out.with_name(f"{out.stem}-{i}.png"))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--pipeline", required=True, help="a pipeline folder (ours or Stable Diffusion 1.x/2.x), or "
                        "a single .safetensors file written by `python -m ldm.export single-file`")
    parser.add_argument("--lora", default=None, help="a LoRA folder (runs/<name>/lora) or .safetensors file, in "
                                                     "diffusers' or kohya-ss's layout")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="how much of the adapters' change to apply")
    parser.add_argument("--embedding", action="append", default=[],
                        help="a textual-inversion embedding (runs/<name>/textual_inversion or a .safetensors file, "
                             "diffusers' or AUTOMATIC1111's layout); repeatable")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (None: what the run sampled with, from sampling.json; else 50)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (None: the run's, from sampling.json; else 3.0)")
    parser.add_argument("--height", type=int, default=None, help="image height (None: the run's training size)")
    parser.add_argument("--width", type=int, default=None, help="image width (None: the run's training size)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="rescale guided outputs towards the conditional one's std (0 off; 0.7 in Lin et al.)")
    parser.add_argument("--scheduler", default=None, choices=list(SAMPLERS),
                        help="None: the run's (sampling.json), else the one saved in the pipeline folder")
    parser.add_argument("--variance", default=None, choices=list(VARIANCES),
                        help="a learned-variance model's Σ: learned (default with ddpm), or a fixed one")
    parser.add_argument("--noise-level", type=int, nargs="+", default=None,
                        help="a cascade's augmentation level at sampling (0-999 of the low-resolution schedule), "
                             "one for every super-resolution stage or one per stage (default: saved with it)")
    parser.add_argument("--image", default=None, help="an input image: image-to-image, or inpainting with --mask")
    parser.add_argument("--mask", default=None, help="with --image: a mask image (white: draw anew, black: keep)")
    parser.add_argument("--strength", type=float, default=None,
                        help="with --image: how far to noise it, 0 (keep) to 1 (pure noise); default 0.8 for "
                             "image-to-image, 1.0 for inpainting")
    parser.add_argument("--seed", type=int, default=0, help="the first image's seed; the others count up from it")
    parser.add_argument("--out", default="samples.png", help="the grid PNG; each image is written beside it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        logging.basicConfig(level=logging.INFO)
        check_out(args.out)  # before minutes of sampling
        settings = sampling_settings(args)
        pipe = load_pipeline(args.pipeline, args.lora, settings.get("scheduler"), args.variance, args.embedding,
                             args.lora_scale)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"cross_attention_kwargs": {"scale": args.lora_scale}} if args.lora else {}
        if args.noise_level is not None:
            if not isinstance(pipe, CascadePipeline):
                raise ValueError(f"--noise-level is for cascades; {args.pipeline!r} holds no cascade.json")
            kwargs["noise_level"] = args.noise_level[0] if len(args.noise_level) == 1 else args.noise_level
        if args.mask and not args.image:
            raise ValueError("--mask needs --image (the image to inpaint)")
        if args.image:
            pipe, extra = from_image(pipe, args)
            kwargs.update(extra)
        images, infos = draw_prompts(pipe, args, settings, kwargs)
        out = save_drawn(Path(args.out), images, infos, args.num_images)
        print(f"wrote {out} ({len(images)} images) and {out.stem}-0..{len(images) - 1}.png beside it")


if __name__ == "__main__":
    main()
