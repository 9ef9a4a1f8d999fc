"""Textual inversion (Gal et al. 2022): a new word learnt as embedding vectors, everything else frozen.

The placeholder token (and, for ``num_vectors`` > 1, ``<token>_1`` … ``<token>_{n-1}``, diffusers' naming of
multi-vector embeddings) is added to the tokenizer; its rows of the text encoder's embedding table start
from the initializer token's and are the only weights that change: the gradients of every other row are
masked to zero and the group has no weight decay, so AdamW leaves them bit for bit. A caption that names the
placeholder is expanded to all its vectors, as diffusers' pipelines expand prompts. A model with two text
encoders (Stable Diffusion XL) learns the word in both: the token goes into both tokenizers and each encoder
trains its own rows.

The export is ``learned_embeds.safetensors`` ({placeholder: (n, D)}, diffusers' layout, which
``load_textual_inversion`` and ``LDMPipeline`` load) and ``<name>.safetensors`` ({"emb_params": (n, D)},
AUTOMATIC1111's layout: the prompt names it by the file's stem). For two encoders it is ``<name>.safetensors``
holding {"clip_l": (n, D1), "clip_g": (n, D2)}, the first and second encoder's rows: the SDXL embedding
AUTOMATIC1111 and ComfyUI read, and `load_embedding` (diffusers: one ``load_textual_inversion`` per encoder).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ldm.engine.config import Checker
from ldm.methods.base import ExportJob, Method
from ldm.methods.metadata import run_modelspec
from pipelines.files import atomic_save_dir

logger = logging.getLogger(__name__)

EMBEDS_FILE = "learned_embeds.safetensors"


def vector_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The tokens of a placeholder's vectors, named as diffusers names multi-vector embeddings."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def is_a_word(tokenizer, token: str) -> bool:
    """Whether the tokenizer already keeps ``token`` whole: a new embedding under it would take that word over in
    every prompt and caption that uses it."""
    return token in tokenizer.get_vocab() or len(tokenizer.tokenize(token)) == 1


def add_placeholder(tokenizer, text_encoder, fc, name: str = "this model's tokenizer") -> list[torch.nn.Parameter]:
    """Add ``fc.placeholder_token``'s vectors to the tokenizer and the text encoder, initialised from
    ``fc.initializer_token``; freeze everything else. Returns the parameter to optimise (the embedding table,
    whose other rows get zero gradients). ``name``: the tokenizer, as errors call it."""
    init = tokenizer.encode(fc.initializer_token, add_special_tokens=False)
    if len(init) != 1:
        raise ValueError(f"finetune.initializer_token={fc.initializer_token!r} is {len(init)} tokens for {name} "
                         f"({tokenizer.tokenize(fc.initializer_token)}); pick a word it keeps whole (one token)")
    tokens = vector_tokens(fc.placeholder_token, fc.num_vectors)
    taken = [t for t in tokens if is_a_word(tokenizer, t)]
    if taken:
        raise ValueError(f"finetune.placeholder_token={fc.placeholder_token!r}: {taken} already in the vocabulary of {name}; "
                         f"pick a new word, e.g. '<{fc.placeholder_token.strip('<>')}-new>'")
    tokenizer.add_tokens(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set below
    ids = tokenizer.convert_tokens_to_ids(tokens)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[init[0]].clone()
    text_encoder.requires_grad_(False)
    table.requires_grad_(True)
    keep = torch.zeros(table.shape[0], 1, dtype=table.dtype)
    keep[ids] = 1
    table.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
    logger.info("textual inversion: %s (%d vector%s, ids %s) from %r; %d trainable values, all else frozen",
                fc.placeholder_token, len(ids), "s" * (len(ids) > 1), ids, fc.initializer_token,
                len(ids) * table.shape[1])
    return [table]


def check_captions(captions: list[str], placeholder: str) -> None:
    """The captions must name the placeholder, or nothing is learnt."""
    named = sum(placeholder in c for c in captions)
    if not named:
        raise ValueError(f"no caption names finetune.placeholder_token={placeholder!r}: write it in the captions "
                         f"where the concept goes (e.g. 'a {placeholder} circle'); first caption: {captions[0]!r}")
    if named < len(captions):
        logger.warning("%d of %d captions name %s; the others train nothing", named, len(captions), placeholder)


def learned_embeddings(text_encoder, tokenizer, fc) -> torch.Tensor:
    """(num_vectors, D) float32 rows of the placeholder's vectors."""
    ids = tokenizer.convert_tokens_to_ids(vector_tokens(fc.placeholder_token, fc.num_vectors))
    return text_encoder.get_input_embeddings().weight[ids].detach().float().cpu()


def a1111_name(placeholder: str) -> str:
    """The placeholder as a file stem (AUTOMATIC1111 calls an embedding by its file's name)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", placeholder) or "embedding"


def save_embeddings(folder: str | Path, placeholder: str, vectors: torch.Tensor,
                    metadata: dict[str, str] | None = None) -> list[Path]:
    """Write the vectors into ``folder`` in diffusers' layout and in AUTOMATIC1111's, with ``metadata`` in their
    headers; return both paths."""
    from safetensors.torch import save_file

    vectors, more = vectors.contiguous(), metadata or {}
    paths = [Path(folder) / EMBEDS_FILE, Path(folder) / f"{a1111_name(placeholder)}.safetensors"]
    save_file({placeholder: vectors}, str(paths[0]), metadata={"format": "pt", **more})
    save_file({"emb_params": vectors}, str(paths[1]), metadata={"format": "pt", "name": placeholder, **more})
    return paths


SDXL_EMBEDDING_KEYS = ["clip_g", "clip_l"]  # an SDXL embedding as AUTOMATIC1111 and ComfyUI read it: one per encoder


def save_sdxl_embedding(folder: str | Path, placeholder: str, vectors: list[torch.Tensor],
                        metadata: dict[str, str] | None = None) -> Path:
    """Write an SDXL embedding, the first encoder's (CLIP-L's) rows as ``clip_l`` and the second's (bigG's) as
    ``clip_g``, into ``folder/<name>.safetensors``; return its path."""
    from safetensors.torch import save_file

    if len(vectors) != 2:
        raise ValueError(f"an SDXL embedding holds two encoders' vectors (clip_l, clip_g), got {len(vectors)}")
    path = Path(folder) / f"{a1111_name(placeholder)}.safetensors"
    save_file({"clip_l": vectors[0].contiguous(), "clip_g": vectors[1].contiguous()}, str(path),
              metadata={"format": "pt", "name": placeholder, **(metadata or {})})
    return path


def embedding_file(folder: str | Path) -> Path:
    """The embedding file of a run's ``textual_inversion`` folder: diffusers' layout if there, else the folder's one
    ``.safetensors`` file (an SDXL embedding)."""
    folder = Path(folder)
    if (folder / EMBEDS_FILE).is_file():
        return folder / EMBEDS_FILE
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{str(folder)!r} holds neither {EMBEDS_FILE} nor exactly one .safetensors "
                                f"embedding (found {[f.name for f in files]})")
    return files[0]


def load_embedding(pipe, path: str | Path) -> None:
    """Load a textual-inversion file into ``pipe`` (diffusers' ``load_textual_inversion``): diffusers' layout
    names its token; AUTOMATIC1111's ({"emb_params": ...}) is called by the name in its metadata, else by the
    file's stem, as AUTOMATIC1111 calls it. An SDXL embedding ({"clip_l": ..., "clip_g": ...}) goes into an SDXL
    pipeline's two encoders under that name; one encoder's embedding does not fit an SDXL pipeline, nor the
    reverse, and says so."""
    from safetensors import safe_open

    path = Path(path)
    token, keys = None, []
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            keys = sorted(f.keys())
            if keys in (["emb_params"], SDXL_EMBEDDING_KEYS):
                token = (f.metadata() or {}).get("name") or path.stem
            vectors = {k: f.get_tensor(k) for k in keys} if keys == SDXL_EMBEDDING_KEYS else None
    if token is None and len(keys) == 1:  # diffusers' layout: {token: vectors}
        token = keys[0]
    if token is not None and is_a_word(pipe.tokenizer, token):
        raise ValueError(f"{path} would be loaded under {token!r}, a word {type(pipe).__name__}'s tokenizer already "
                         f"keeps whole: it would take that word over in every prompt; rename the file (AUTOMATIC1111's "
                         f"embeddings are called by their file's name), e.g. to <{token}>.safetensors")
    two_encoders = getattr(pipe, "text_encoder_2", None) is not None
    if two_encoders != (keys == SDXL_EMBEDDING_KEYS):
        raise ValueError(f"{path} holds {'an SDXL embedding (clip_l, clip_g)' if not two_encoders else 'one encoder'}"
                         f"'s vectors, which {type(pipe).__name__} ({'two' if two_encoders else 'one'} text "
                         f"encoder(s)) cannot take")
    if not two_encoders:
        pipe.load_textual_inversion(str(path), token=token)
        return
    pipe.load_textual_inversion(vectors["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


class TextualInversion(Method):
    """A new word's embedding vectors train, in every text encoder of the model, and nothing else. Exports them in
    diffusers' and AUTOMATIC1111's layouts, or as one SDXL embedding for two encoders (``<run>/textual_inversion``)."""

    families = ("sd", "sdxl")

    def check(self, c: Checker) -> None:
        cfg = c.cfg
        fc = cfg.finetune
        c.require(bool(cfg.model.pretrained), "finetune.method",
                  "textual_inversion needs model.pretrained: the model whose vocabulary it extends")
        c.require(bool(fc.placeholder_token) and not any(ch.isspace() for ch in fc.placeholder_token),
                  "finetune.placeholder_token", "needs one word without spaces, e.g. '<my-concept>'")
        c.require(bool(fc.initializer_token), "finetune.initializer_token",
                  "needs a word the tokenizer keeps whole, close to the concept (e.g. 'red' for a new colour)")
        c.at_least("finetune.num_vectors", 1)
        c.require(not cfg.model.train_text_encoder, "model.train_text_encoder",
                  "textual_inversion trains only the new embeddings: leave the text encoder frozen")
        c.require(cfg.diffusion.pretrained_schedule == "keep", "diffusion.pretrained_schedule",
                  "textual_inversion leaves the U-Net as it is, so it keeps the model's schedule: use 'keep'")
        c.require(cfg.train.ema_decay is None, "train.ema_decay",
                  "the EMA averages U-Net weights, and textual_inversion trains none: leave it null")

    def check_captions(self, cfg, captions: list[str]) -> None:
        check_captions(captions, cfg.finetune.placeholder_token)

    def trainable(self, cfg, comp) -> list[dict]:
        comp.train_text_encoder = True  # the embedding tables train: encoded every step, synchronised under DDP
        comp.unet.requires_grad_(False)
        sides = comp.text_sides()
        names = ["this model's tokenizer"] if len(sides) == 1 else ["the first tokenizer (tokenizer/)",
                                                                    "the second tokenizer (tokenizer_2/)"]
        tables = [table for (tokenizer, encoder), name in zip(sides, names)
                  for table in add_placeholder(tokenizer, encoder, cfg.finetune, name)]
        return [{"params": tables, "lr": cfg.train.learning_rate,
                 "weight_decay": 0.0}]  # decay would move the frozen rows

    def export(self, job: ExportJob) -> dict[str, Path]:
        fc, folder = job.cfg.finetune, job.run_dir / "textual_inversion"
        sides = [(job.comp.tokenizer, job.text_encoder)] + job.comp.text_sides()[1:]
        vectors = [learned_embeddings(encoder, tokenizer, fc) for tokenizer, encoder in sides]
        metadata = {**run_modelspec(job.cfg, job.comp, "textual-inversion"), **job.metadata}
        if len(vectors) == 1:
            atomic_save_dir(lambda d: save_embeddings(d, fc.placeholder_token, vectors[0], metadata), folder)
            return {"textual_inversion": folder / EMBEDS_FILE}
        atomic_save_dir(lambda d: save_sdxl_embedding(d, fc.placeholder_token, vectors, metadata), folder)
        return {"textual_inversion": folder / f"{a1111_name(fc.placeholder_token)}.safetensors"}
