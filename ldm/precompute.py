"""Encode a run's streamed shards once into latent shards, so that training streams VAE posteriors instead of
images and skips the per-step encode.

    python -m ldm.precompute --config configs/ldm/....yaml --out /data/laion-latents \\
        data.dataset='/data/laion-{000000..009999}.tar'
    accelerate launch -m ldm.precompute ...            # several processes share the shards

Each input shard becomes a latent shard of the same name in ``--out``: per sample its caption
(``.txt``), the posterior mean and std of its image cut as the run cuts it (``.mean.npy``, ``.std.npy``, float16)
and ``.json`` (the VAE's encoder fingerprint, the cut size, and the size conditions Stable Diffusion XL trains
with: the image's size and where it was cut). When the run fine-tunes a pretrained model with
its text encoder frozen, the caption's embedding (the encoder's last hidden state (L, D), ``.ctx.npy``, float16)
and the encoder's fingerprint are written too, and training reads them instead of running the encoder. Process p of P encodes shards p, p + P, ...;
each is written under a temporary name and renamed when complete, so a killed run goes on where it stopped (the
finished shards are skipped). Bad samples are skipped and counted as in training. Train from the output with
``data.dataset=<the --out folder>`` and the same VAE (another VAE is refused by its fingerprint).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(array: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.numpy().astype(np.float16))
    return buf.getvalue()


def encode_shard(url: str, dest: Path, vae, transform, resolution: int, fingerprint: str, report,
                 batch_size: int = 32, min_size: int = 0, text: tuple | None = None) -> int:
    """Write the latent shard of ``url`` to ``dest`` (through a temporary file); returns the samples written.
    ``text``: (tokenizer, frozen text encoder, its fingerprint) whose embeddings of the captions are written too."""
    from ldm.data.size_conditions import crop_conditions
    from ldm.data.stream import ShardStream
    from ldm.models.vae import encode

    stream = ShardStream([url], seed=0, stream=0, num_streams=1, min_size=min_size, report=report)
    tmp = dest.with_name(dest.name + ".tmp")
    written, pending = 0, []
    with tarfile.open(tmp, "w") as tar:
        def flush():
            nonlocal written
            pixels = torch.stack([transform(image, size=(resolution, resolution)) for _, image, _ in pending])
            mean, std = encode(vae, pixels)
            contexts = embed(text, [caption for _, _, caption in pending], pixels.device)
            meta = {"vae": fingerprint, "size": [resolution, resolution], **({"text": text[2]} if text else {})}
            for (key, image, caption), m, s, c in zip(pending, mean.cpu(), std.cpu(), contexts):
                time_ids = crop_conditions(transform, (image.height, image.width), (resolution, resolution))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.mean.npy", _npy(m))
                _add(tar, f"{key}.std.npy", _npy(s))
                if c is not None:
                    _add(tar, f"{key}.ctx.npy", _npy(c))
                _add(tar, f"{key}.json", json.dumps({**meta, "time_ids": time_ids}).encode())
            written += len(pending)
            pending.clear()

        for sample in stream._raw(url, 0):
            decoded = stream.decode(url, sample)
            if decoded is not None:
                pending.append((sample["__key__"], *decoded))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    os.replace(tmp, dest)
    return written


@torch.no_grad()
def embed(text: tuple | None, captions: list[str], device) -> list:
    """The frozen text encoder's last hidden state (L, D) of each caption, or Nones without ``text``."""
    if text is None:
        return [None] * len(captions)
    from ldm.models.text import tokenize

    tokenizer, encoder, _ = text
    return list(encoder(tokenize(tokenizer, captions).to(device))[0].float().cpu())


def frozen_text_side(cfg, folder: Path | None, device) -> tuple | None:
    """(tokenizer, text encoder, fingerprint) of the pretrained model's frozen text encoder, whose embeddings the
    latent shards carry; None when there is none to embed with: a new model (its tokenizer is learned from the
    captions), a trained text encoder, or two text encoders (Stable Diffusion XL, not streamed yet)."""
    if folder is None or cfg.model.train_text_encoder or (folder / "text_encoder_2").is_dir():
        return None
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.models.text import text_fingerprint

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True).to(device).eval()
    return tokenizer, encoder, text_fingerprint(encoder, tokenizer)


def precompute(cfg, out: str | Path, accelerator=None) -> dict:
    """Encode the shards of ``cfg.data.dataset`` into ``out`` (see the module docstring); the counts."""
    from ldm.data.images import ImageTransform
    from ldm.data.stream import StreamReport, expand_shards
    from ldm.models.components import pretrained_folder
    from ldm.models.vae import encoder_fingerprint, load_vae

    d = cfg.data
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    folder = pretrained_folder(cfg, accelerator)
    vae = load_vae(str(folder / "vae") if folder is not None else cfg.model.vae).to(device).eval()
    fingerprint = encoder_fingerprint(vae)
    text = frozen_text_side(cfg, folder, device)
    transform = ImageTransform(d.resolution, d.center_crop, False, tuple(d.alpha_background), d.crop_scale)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report, counts = StreamReport(), {"shards_written": 0, "shards_skipped": 0, "samples": 0}
    shards = expand_shards(d.dataset)
    from tqdm.auto import tqdm

    for i in tqdm(range(rank, len(shards), world), desc="encoding shards", disable=rank != 0):
        dest = out / Path(shards[i]).name
        if dest.is_file():  # finished by an earlier run
            counts["shards_skipped"] += 1
            continue
        counts["samples"] += encode_shard(shards[i], dest, vae, transform, d.resolution, fingerprint, report,
                                          min_size=d.min_image_size, text=text)
        counts["shards_written"] += 1
    counts["bad_samples_skipped"] = dict(report.bad)
    counts["shard_reads_failed"] = len(report.unreachable)
    counts["text_embeddings"] = text is not None
    return counts


def main(argv=None) -> None:
    """``python -m ldm.precompute --config CFG --out DIR [key=value ...]`` (see the module docstring)."""
    import argparse

    from ldm.engine.accelerator import make_accelerator
    from ldm.engine.cli import user_errors
    from ldm.engine.config import load_config
    from ldm.trainer.config import LDMConfig

    parser = argparse.ArgumentParser(prog="python -m ldm.precompute", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--out", required=True, help="folder for the latent shards")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    with user_errors(args.debug):
        cfg = load_config(LDMConfig, args.config, args.overrides)
        accelerator = make_accelerator()
        counts = precompute(cfg, args.out, accelerator)
        print(json.dumps({"process": accelerator.process_index, **counts}))
        accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
