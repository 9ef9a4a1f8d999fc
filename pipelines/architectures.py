"""A single file that comes without its configs (a checkpoint downloaded from a model site): which model it holds,
told from its keys and shapes, and the diffusers configs that rebuild it.

- Stable Diffusion 1.x: CLIP ViT-L under ``cond_stage_model.transformer.`` (transformers' names).
- Stable Diffusion 2.x: OpenCLIP ViT-H under ``cond_stage_model.model.`` (OpenCLIP's names), used to its
  penultimate layer; v-prediction at 768 px (2.x's released "768-v") unless the file says otherwise (a
  ``modelspec.prediction_type``, an empty ``v_pred`` tensor, or ``parameterization`` in the ``.yaml`` beside it),
  else ε at 512 when it says ``epsilon``.
- Stable Diffusion XL base: CLIP ViT-L and OpenCLIP bigG under ``conditioner.embedders.0/1.``, the U-Net's
  added text/time embedding as ``label_emb``; ``v_pred`` / ``ztsnr`` markers set its schedule.

Every size is read from the shapes (levels, channels, blocks per level, attention and transformer depth, context
and text widths, layers, vocabulary); what weights do not show follows the family's released models: attention
heads (8 for 1.x, 64-wide for 2.x and XL), 32 normalisation groups, the VAE's scaling factor, the CLIP tokenizer
(its merges ship with the package) and the schedule (scaled-linear betas 0.00085 to 0.012 over 1000 steps).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT = {"sd1": ["cond_stage_model.transformer.text_model."], "sd2": ["cond_stage_model.model."],
        "sdxl": ["conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."]}
SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
BPE = Path(__file__).parent / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


def file_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({key: shape}, header metadata) of a ``.safetensors`` file, read without loading a tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})


def detect(shapes: dict) -> str | None:
    """"sd1", "sd2" or "sdxl" from the file's keys, or None."""
    keys = list(shapes)
    if not any(k.startswith(UNET) for k in keys):
        return None
    for family in ("sdxl", "sd2", "sd1"):
        if all(any(k.startswith(prefix) for k in keys) for prefix in TEXT[family]):
            return family
    return None


def prediction_type(family: str, shapes: dict, metadata: dict, path: Path) -> str:
    """The file's prediction type: said by its metadata, a ``v_pred`` marker or the ``.yaml`` beside it, else
    the family's released default (v for 2.x, ε for 1.x and XL)."""
    said = metadata.get("modelspec.prediction_type")
    if said in ("v", "epsilon"):
        return "v_prediction" if said == "v" else "epsilon"
    if "v_pred" in shapes:
        return "v_prediction"
    beside = path.with_suffix(".yaml")
    if beside.is_file() and re.search(r"parameterization:\s*['\"]?v['\"]?\s*$", beside.read_text(errors="replace"), re.M):
        return "v_prediction"
    if family == "sd2":
        logger.warning("%s: a Stable Diffusion 2.x file that does not say its prediction type: taken as v-prediction "
                       "(2.x's 768-v); for the 512 ε model add modelspec.prediction_type=epsilon or use its "
                       "config folder", path.name)
        return "v_prediction"
    return "epsilon"


def _count(shapes: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes for m in [rx.match(k)] if m})


def unet_config(shapes: dict, family: str) -> dict:
    """The U-Net's diffusers config from the original layout's shapes (see the module docstring)."""
    s = {k[len(UNET):]: v for k, v in shapes.items() if k.startswith(UNET)}
    base, in_channels = s["input_blocks.0.0.weight"][:2]
    levels, k = [], 1
    while f"input_blocks.{k}.0.in_layers.0.weight" in s or f"input_blocks.{k}.0.op.weight" in s:
        if f"input_blocks.{k}.0.op.weight" in s:
            levels.append(None)  # a downsampler closes the level
        else:
            depth = _count(s, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.")
            levels.append((s[f"input_blocks.{k}.0.out_layers.3.weight"][0], depth))
        k += 1
    groups, current = [], []
    for entry in levels + [None]:
        if entry is None:
            groups.append(current)
            current = []
        else:
            current.append(entry)
    attn_key = next(k for k in s if k.endswith("attn2.to_k.weight"))
    channels = [g[0][0] for g in groups]
    depths = [g[0][1] for g in groups]
    heads = [8] * len(channels) if family == "sd1" else [max(1, c // 64) for c in channels]
    config = {"sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128}[family], "in_channels": in_channels,
              "out_channels": s["out.2.weight"][0], "block_out_channels": channels,
              "layers_per_block": len(groups[0]), "cross_attention_dim": s[attn_key][1],
              "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
              "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
              "attention_head_dim": heads[0] if family == "sd1" else heads,
              "transformer_layers_per_block": [max(d, 1) for d in depths],
              "use_linear_projection": len(s[next(k for k in s if k.endswith("proj_in.weight"))]) == 2,
              "mid_block_type": "UNetMidBlock2DCrossAttn"}
    if family == "sd2" and base:
        config["upcast_attention"] = True  # 2.x's attention overflows in fp16 without it
    if "label_emb.0.0.weight" in s:  # SDXL's pooled text + six size conditions
        pooled = shapes["conditioner.embedders.1.model.text_projection"][1]
        config.update({"addition_embed_type": "text_time", "addition_time_embed_dim":
                       (s["label_emb.0.0.weight"][1] - pooled) // 6,
                       "projection_class_embeddings_input_dim": s["label_emb.0.0.weight"][1]})
    return config


def vae_config(shapes: dict, family: str) -> dict:
    s = {k[len(VAE):]: v for k, v in shapes.items() if k.startswith(VAE)}
    levels = _count(s, r"encoder\.down\.(\d+)\.")
    return {"in_channels": s["encoder.conv_in.weight"][1], "out_channels": s["decoder.conv_out.weight"][0],
            "block_out_channels": [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": _count(s, r"encoder\.down\.0\.block\.(\d+)\."),
            "latent_channels": s["quant_conv.weight"][0] // 2, "sample_size": 1024 if family == "sdxl" else 512,
            "scaling_factor": SCALING[family]}


def text_config(shapes: dict, prefix: str, open_clip: bool, penultimate: bool, projection: bool) -> dict:
    """A CLIP text encoder's transformers config from its weights (transformers' names, or OpenCLIP's)."""
    s = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    if open_clip:
        vocab, width = s["token_embedding.weight"]
        positions, layers = s["positional_embedding"][0], _count(s, r"transformer\.resblocks\.(\d+)\.")
        inner = s["transformer.resblocks.0.mlp.c_fc.weight"][0]
    else:
        vocab, width = s["embeddings.token_embedding.weight"]
        positions, layers = s["embeddings.position_embedding.weight"][0], _count(s, r"encoder\.layers\.(\d+)\.")
        inner = s["encoder.layers.0.mlp.fc1.weight"][0]
    config = {"vocab_size": vocab, "hidden_size": width, "intermediate_size": inner,
              "num_hidden_layers": max(1, layers - 1) if penultimate else layers,
              "num_attention_heads": max(1, width // 64), "max_position_embeddings": positions,
              "hidden_act": "gelu" if open_clip else "quick_gelu", "projection_dim": width,
              "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
    if projection:
        config["projection_dim"] = s["text_projection"][1]
    return config


def clip_bytes() -> tuple[list[int], list[int]]:
    """(byte values, their printable stand-ins' code points) in CLIP's order: the printable bytes first, as
    themselves, then the others mapped past 255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return bs, cs


def _byte_symbols() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values, in its vocabulary's order."""
    return [chr(c) for c in clip_bytes()[1]]


def write_tokenizer(folder: Path, pad: str = "<|endoftext|>") -> None:
    """CLIP's tokenizer files (vocab.json, merges.txt) built from the shipped merges as CLIP builds its vocabulary:
    the 256 byte symbols, the same with ``</w>``, one token per merge (the first 48,894), then the start and end
    tokens (49,408 in all). ``pad``: OpenCLIP's models (2.x, XL's second) pad with "!"."""
    merges = gzip.open(BPE).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad, "tokenizer_class": "CLIPTokenizer"}), encoding="utf-8")


def _write(folder: Path, name: str, config: dict, class_name: str) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "config.json").write_text(json.dumps({"_class_name": class_name, **config}), encoding="utf-8")


def write_configs(path: Path, folder: Path) -> str:
    """Write the diffusers config folder of the single file ``path`` into ``folder``; return its family. Raises
    ValueError for a file of no family here."""
    shapes, metadata = file_shapes(path)
    family = detect(shapes)
    if family is None:
        raise ValueError(f"{str(path)!r} holds no Stable Diffusion 1.x, 2.x or XL base model that its keys tell: "
                         f"pass config=<a diffusers folder of its architecture>")
    folder.mkdir(parents=True, exist_ok=True)
    xl = family == "sdxl"
    unet, vae = unet_config(shapes, family), vae_config(shapes, family)
    odd = [c for c in unet["block_out_channels"] + vae["block_out_channels"] if c % 32]
    if odd:  # the family's models normalise in 32 groups; this one cannot (a small model of its own)
        raise ValueError(f"{str(path)!r} reads as {family} from its keys, but its channels {odd} do not divide into "
                         f"the 32 normalisation groups of that family's models: it is a model of its own sizes; "
                         f"pass config=<a diffusers folder of its architecture>")
    _write(folder, "unet", unet, "UNet2DConditionModel")
    _write(folder, "vae", vae, "AutoencoderKL")
    first = TEXT[family][0]
    text = text_config(shapes, first, family == "sd2", family == "sd2", False)
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"], **text}))
    write_tokenizer(folder / "tokenizer", "!" if family == "sd2" else "<|endoftext|>")
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if xl:
        second = text_config(shapes, TEXT[family][1], True, False, True)
        (folder / "text_encoder_2").mkdir()
        (folder / "text_encoder_2" / "config.json").write_text(
            json.dumps({"architectures": ["CLIPTextModelWithProjection"], **second}))
        write_tokenizer(folder / "tokenizer_2", "!")
        index.update({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
    else:
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                      "requires_safety_checker": False})
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
                 "steps_offset": 1, "prediction_type": prediction_type(family, shapes, metadata, path),
                 "rescale_betas_zero_snr": "ztsnr" in shapes,
                 "timestep_spacing": "trailing" if "ztsnr" in shapes else "leading"}
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler), encoding="utf-8")
    logger.info("%s came without configs: read as %s from its keys and shapes (%s)", path.name,
                {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL base"}[family],
                scheduler["prediction_type"])
    return family
