"""Stable Diffusion's original single-file layout (CompVis' latent-diffusion names, as AUTOMATIC1111, ComfyUI and
diffusers' ``from_single_file`` read them), and Stable Diffusion XL's (Stability's generative-models, ``sgm``):
the names of a pipeline's weights in it, writing a pipeline into one ``.safetensors`` file, and reading the
components back through diffusers' own single-file loader.

A Stable Diffusion 1.x/2.x file holds three models under three prefixes:

- ``model.diffusion_model.``: the U-Net as ``openaimodel.UNetModel`` names it. ``input_blocks.0.0`` is
  ``conv_in``; then per level, ``layers_per_block`` entries of [resnet, attention] and, below the last level, one
  entry holding the downsampler (``.0.op``); ``middle_block`` is [resnet, attention, resnet]; ``output_blocks``
  hold ``layers_per_block + 1`` entries per level of [resnet, attention, upsampler (``.conv``)];
  ``time_embed.{0,2}`` and ``out.{0,2}``. Resnets call their layers ``in_layers`` / ``emb_layers`` /
  ``out_layers`` / ``skip_connection``; the spatial transformers keep diffusers' names (any number of
  ``transformer_blocks``).
- ``first_stage_model.``: the VAE, ``encoder.down.N.block.M`` (``downsample``), ``mid.block_1`` / ``attn_1`` /
  ``block_2`` with its attention's q, k, v and proj_out as 1×1 convolutions, and ``decoder.up.N`` numbered from
  the highest resolution, the reverse of diffusers' order.
- ``cond_stage_model.transformer.``: the CLIP text encoder with transformers' names (Stable Diffusion 1.x).

A Stable Diffusion XL file holds the U-Net and the VAE under the same names (the U-Net's added text/time
embedding as ``label_emb.0.0`` / ``label_emb.0.2``) and its two text encoders in generative-models' conditioner:

- ``conditioner.embedders.0.transformer.``: CLIP ViT-L (``text_encoder``) with transformers' names;
- ``conditioner.embedders.1.model.``: OpenCLIP bigG (``text_encoder_2``) with OpenCLIP's names:
  ``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.N.{ln_1, ln_2, attn.in_proj_weight,
  attn.in_proj_bias, attn.out_proj, mlp.c_fc, mlp.c_proj}`` (``in_proj`` is q, k and v concatenated),
  ``ln_final`` and ``text_projection``, a (width, projection) matrix used as ``x @ text_projection``: the
  transpose of transformers' ``text_projection.weight``;
- ``v_pred`` and ``ztsnr``: empty tensors, present when the scheduler predicts v / rescales to zero terminal
  SNR (ComfyUI and Forge read the schedule from them).

The file's metadata keeps, besides ``format``, every file of the pipeline's config folder (model_index.json, each
model's config, the scheduler's, the tokenizers' files) under ``config/<path>``: a small learned tokenizer and
an unusual architecture rebuild from the file alone.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pipelines.files import atomic_save, atomic_save_dir

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
# Stable Diffusion XL's two text encoders (generative-models' conditioner): CLIP ViT-L with transformers' names,
# OpenCLIP bigG with OpenCLIP's.
XL_TEXT_PREFIX, XL_OPEN_CLIP_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
CONFIG_KEY = "config/"  # metadata entries holding the config folder's files
CONFIG_SUFFIX = ".config"  # the folder written beside model.safetensors: model.config/

# diffusers' layer names -> the original's, inside one block (openaimodel.ResBlock's Sequentials; the VAE's
# ResnetBlock keeps norm1/conv1/norm2/conv2; its AttnBlock has 1x1 convolutions q, k, v, proj_out).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
UNET_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention
UNET_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
UNET_MID = "UNetMidBlock2DCrossAttn"
# Added embeddings the layout has names for: none (SD 1.x/2.x), or SDXL's pooled-text + size conditions
# (generative-models' label_emb).
UNET_ADDED = {None: {}, "text_time": {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}}
# U-Net settings whose weights the layout has no names for (or diffusers' converter does not read back), with
# the only value it takes.
UNET_PLAIN = {"class_embed_type": None, "encoder_hid_dim": None,
              "time_cond_proj_dim": None, "time_embedding_type": "positional", "dual_cross_attention": False,
              "attention_type": "default"}
# transformers' CLIP text-encoder names -> OpenCLIP's: outside the layers, and inside layer N
# (``transformer.resblocks.N``; q, k and v are one ``attn.in_proj_*``).
OPEN_CLIP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPEN_CLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# model_index.json entries of a Stable Diffusion pipeline's optional components (no safety checker)
SD_INDEX_ENTRIES = {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32}


# ---- names --------------------------------------------------------------------------------------------------

def unet_blocks(config) -> dict[str, tuple[str, dict]]:
    """{diffusers module: (original module, layer renames)} for a U-Net ``config``."""
    check_unet(config)
    n, down, up = config.layers_per_block, config.down_block_types, config.up_block_types
    blocks = {"time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
              "conv_in": ("input_blocks.0.0", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {})}
    blocks.update({module: (original, {}) for module, original in UNET_ADDED[config.addition_embed_type].items()})
    k = 1  # input_blocks.0 is conv_in
    for i, kind in enumerate(down):
        for j in range(n):
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", UNET_RESNET)
            if UNET_DOWN[kind]:
                blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
            k += 1
        if i < len(down) - 1:  # every level but the lowest halves the size, in an entry of its own
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", {})
            k += 1
    blocks.update({"mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
                   "mid_block.attentions.0": ("middle_block.1", {}),
                   "mid_block.resnets.1": ("middle_block.2", UNET_RESNET)})
    k = 0
    for i, kind in enumerate(up):
        for j in range(n + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", UNET_RESNET)
            if UNET_UP[kind]:
                blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
            if j == n and i < len(up) - 1:  # the upsampler follows the level's last resnet (and attention)
                blocks[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k}.{1 + UNET_UP[kind]}.conv", {})
            k += 1
    return blocks


def vae_blocks(config) -> dict[str, tuple[str, dict]]:
    """{diffusers module: (original module, layer renames)} for an AutoencoderKL ``config``."""
    check_vae(config)
    n = config.layers_per_block
    down, up = len(config.down_block_types), len(config.up_block_types)
    blocks = {name: (name, {}) for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
                                            "decoder.conv_out", "quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        blocks[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        blocks[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET)
        blocks[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
        blocks[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET)
    for i in range(down):
        for j in range(n):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        if i < down - 1:
            blocks[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
    for i in range(up):
        level = up - 1 - i  # the original numbers the decoder's levels from the highest resolution
        for j in range(n + 1):
            blocks[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", VAE_RESNET)
        if i < up - 1:
            blocks[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    return blocks


def check_unet(config) -> None:
    """Raise ValueError for a U-Net the original layout (as diffusers' converter reads it) cannot hold."""
    if config.num_class_embeds is not None:
        raise ValueError(f"the U-Net has class embeddings (num_class_embeds={config.num_class_embeds}, a "
                         f"super-resolution stage?): Stable Diffusion's single-file layout holds text-to-image "
                         f"U-Nets only; save it as a pipeline folder instead")
    if config.addition_embed_type not in UNET_ADDED:
        raise ValueError(f"unet addition_embed_type={config.addition_embed_type!r}: the original layout has names "
                         f"for {list(UNET_ADDED)} only")
    for key, plain in UNET_PLAIN.items():
        if getattr(config, key, plain) != plain:
            raise ValueError(f"unet {key}={getattr(config, key)!r}: the single-file layout holds only {key}={plain!r}")
    if isinstance(config.layers_per_block, bool) or not isinstance(config.layers_per_block, int):
        raise ValueError(f"unet layers_per_block={config.layers_per_block!r}: the single-file layout needs one int "
                         f"for every level")
    for key, known in (("down_block_types", UNET_DOWN), ("up_block_types", UNET_UP)):
        bad = [t for t in getattr(config, key) if t not in known]
        if bad:
            raise ValueError(f"unet {key} holds {bad}: the single-file layout has names for {list(known)} only")
    if config.mid_block_type != UNET_MID:
        raise ValueError(f"unet mid_block_type={config.mid_block_type!r}: the single-file layout holds "
                         f"{UNET_MID!r} only")


def check_vae(config) -> None:
    for key, known in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in getattr(config, key) if t != known]
        if bad:
            raise ValueError(f"vae {key} holds {bad}: the single-file layout has names for {known!r} only")


def _rename(key: str, blocks: dict[str, tuple[str, dict]]) -> str | None:
    """The original name of the weight ``key`` (module path + parameter), None where no block holds it."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest module prefix that is a block
        block = ".".join(parts[:cut])
        if block in blocks:
            target, renames = blocks[block]
            layer, param = ".".join(parts[cut:-1]), parts[-1]
            layer = renames.get(layer, layer)
            return ".".join(p for p in (target, layer, param) if p)
    return None


def original_unet_module(module: str, config) -> str:
    """The original layout's name of a U-Net module (a layer, e.g. an attention's ``to_q``) of ``config``."""
    name = _rename(module + ".weight", unet_blocks(config))
    if name is None:
        raise ValueError(f"the U-Net module {module!r} has no place in the original layout")
    return name[:-len(".weight")]


def _plain_keys(model) -> set[str]:
    """The weights a model of ``model``'s class and config has, built on the meta device (no memory)."""
    with torch.device("meta"):
        if hasattr(model, "from_config"):  # diffusers
            fresh = type(model).from_config(model.config)
        else:  # transformers
            fresh = type(model)(model.config)
    return set(fresh.state_dict())


def _check_plain(name: str, model, state: dict) -> None:
    """LoRA adapters, fused projections or a compiled wrapper change the weight names: refuse them by name."""
    plain = _plain_keys(model)
    extra, missing = sorted(set(state) - plain), sorted(plain - set(state))
    if extra or missing:
        raise ValueError(f"the {name} holds weights its config does not build (unexpected {extra[:3]}, missing "
                         f"{missing[:3]}): fuse or unload LoRA adapters and call disable_fast() before writing "
                         f"a single file")


def _mapped(name: str, model, prefix: str, blocks: dict) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    _check_plain(name, model, state)
    out = {}
    for key, value in state.items():
        new = _rename(key, blocks)
        if new is None:
            raise ValueError(f"the {name}'s weight {key!r} has no place in the single-file layout")
        out[prefix + new] = value
    if len(out) != len(state):  # two weights under one name would lose one of them
        raise ValueError(f"the {name}'s weights do not map one to one onto the single-file layout")
    return out


def _clip_state(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights under ``prefix`` with transformers' names (``text_model.`` included)."""
    state = text_encoder.state_dict()
    _check_plain("text encoder", text_encoder, state)
    # transformers >= 5.6 dropped the `text_model.` level that the layout (and older versions) have
    return {prefix + (key if key.startswith("text_model.") else "text_model." + key): value
            for key, value in state.items()}


def _open_clip_name(key: str) -> tuple[str, str | None]:
    """(OpenCLIP's name, None) of a transformers CLIP text-encoder weight ``key``; for a q/k/v projection
    (``transformer.resblocks.N.attn.in_proj_<param>``, its part "q", "k" or "v")."""
    name = key.removeprefix("text_model.")
    if name in OPEN_CLIP_NAMES:
        return OPEN_CLIP_NAMES[name], None
    parts = name.split(".")
    layer, param = ".".join(parts[3:-1]), parts[-1]
    if parts[:2] == ["encoder", "layers"] and len(parts) > 4 and param in ("weight", "bias"):
        block = f"transformer.resblocks.{parts[2]}."
        if layer in OPEN_CLIP_QKV:
            return f"{block}attn.in_proj_{param}", layer.rsplit(".", 1)[-1][0]
        if layer in OPEN_CLIP_LAYER:
            return f"{block}{OPEN_CLIP_LAYER[layer]}.{param}", None
    raise ValueError(f"the second text encoder's weight {key!r} has no place in OpenCLIP's layout")


def open_clip_state(text_encoder_2) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights under SDXL's ``conditioner.embedders.1.model.`` with OpenCLIP's
    names: q, k and v concatenated into ``attn.in_proj_weight`` / ``in_proj_bias``, and ``text_projection`` a
    (width, projection) matrix that OpenCLIP multiplies as ``x @ text_projection``, the transpose of
    transformers' ``text_projection.weight`` (as diffusers' ``convert_open_clip_checkpoint`` reads it)."""
    state = text_encoder_2.state_dict()
    _check_plain("second text encoder", text_encoder_2, state)
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.t()
            continue
        name, part = _open_clip_name(key)
        if part is None:
            out[name] = value
        else:
            qkv.setdefault(name, {})[part] = value
    for name, parts in qkv.items():  # (all three there: _check_plain compared the names with the config's)
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {XL_OPEN_CLIP_PREFIX + name: value for name, value in out.items()}


def _check_types(models: dict) -> None:
    """Each of ``models`` ({name: (model, class name wanted)}) is of the class the layout holds."""
    for name, (model, want) in models.items():
        if type(model).__name__ != want:
            raise ValueError(f"the {name} is a {type(model).__name__}: the single-file layout holds a {want} there")


def layout_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The models' weights under their original names (tensors shared with the models, but for SDXL's
    concatenated q/k/v): Stable Diffusion 1.x/2.x's three models, or with ``text_encoder_2`` Stable Diffusion
    XL's four (generative-models' layout: the text encoders under ``conditioner.embedders.{0,1}.``)."""
    xl = text_encoder_2 is not None
    _check_types({"unet": (unet, "UNet2DConditionModel"), "vae": (vae, "AutoencoderKL"),
                  "text encoder": (text_encoder, "CLIPTextModel"),
                  **({"second text encoder": (text_encoder_2, "CLIPTextModelWithProjection")} if xl else {})})
    added = unet.config.addition_embed_type
    if (added == "text_time") != xl:
        raise ValueError(f"the U-Net has addition_embed_type={added!r} and the pipeline "
                         f"{'has' if xl else 'has no'} second text encoder: the single-file layout holds Stable "
                         f"Diffusion 1.x/2.x (none, one encoder) or XL ('text_time', two encoders)")
    state = _mapped("unet", unet, UNET_PREFIX, unet_blocks(unet.config))
    vae_state = _mapped("vae", vae, VAE_PREFIX, vae_blocks(vae.config))
    for key, value in vae_state.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original's attention projections are 1x1 convolutions
        state[key] = value
    if not xl:
        state.update(_clip_state(text_encoder, TEXT_PREFIX))
        return state
    state.update(_clip_state(text_encoder, XL_TEXT_PREFIX))
    state.update(open_clip_state(text_encoder_2))
    return state


def schedule_markers(scheduler_config) -> dict[str, torch.Tensor]:
    """The empty marker tensors ComfyUI and Forge read from an SDXL file for its schedule: ``v_pred`` for a
    v-prediction model, ``ztsnr`` for zero terminal SNR."""
    markers = {}
    if scheduler_config.get("prediction_type", "epsilon") == "v_prediction":
        markers["v_pred"] = torch.tensor([])
    if scheduler_config.get("rescale_betas_zero_snr", False):
        markers["ztsnr"] = torch.tensor([])
    return markers


# ---- writing ------------------------------------------------------------------------------------------------

def config_dir(path: str | Path) -> Path:
    """The config folder beside a single file: ``model.safetensors`` -> ``model.config/``."""
    path = Path(path)
    return path.with_name(path.stem + CONFIG_SUFFIX)


def write_configs(pipe, folder: Path) -> None:
    """The pipeline's folder without weights: what diffusers' ``from_single_file(file, config=folder)`` reads.
    model_index.json names StableDiffusionPipeline (or the pipeline's ``saved_class_name``, e.g.
    StableDiffusionXLPipeline) without a safety checker, as LDMPipeline.save_pretrained writes it."""
    import copy

    pipe.save_config(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    entries = pipe._index_entries() if hasattr(pipe, "_index_entries") else SD_INDEX_ENTRIES
    index.update(_class_name=getattr(pipe, "saved_class_name", "StableDiffusionPipeline"), **entries)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    for suffix in ("", "_2") if getattr(pipe, "text_encoder_2", None) is not None else ("",):
        encoder = getattr(pipe, "text_encoder" + suffix)
        te_config = copy.deepcopy(encoder.config)
        te_config.architectures = [type(encoder).__name__]
        te_config.save_pretrained(folder / ("text_encoder" + suffix))
        getattr(pipe, "tokenizer" + suffix).save_pretrained(folder / ("tokenizer" + suffix))
    pipe.scheduler.save_config(folder / "scheduler")


def folder_metadata(folder: Path) -> dict[str, str]:
    """Every file of ``folder`` as a metadata entry ``config/<relative path>`` (safetensors metadata is str)."""
    return {CONFIG_KEY + p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(folder.rglob("*")) if p.is_file()}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def to_single_file(pipe, out_path: str | Path, dtype=None, metadata: dict[str, str] | None = None) -> Path:
    """Write ``pipe``'s U-Net, VAE and text encoder into one ``.safetensors`` file in the original layout (for a
    Stable Diffusion XL pipeline, its two text encoders in SDXL's layout and the ``v_pred`` / ``ztsnr`` markers
    its schedule calls for), and beside it ``<stem>.config/``, its config folder without weights; return the
    file's path. ``dtype`` (a torch.dtype, "fp16", "bf16" or "fp32") converts the floating-point weights; None
    keeps theirs. A Stable Diffusion 1.x/2.x file gets its original config beside it (``<stem>.yaml``,
    `pipelines.ldm_yaml`), which AUTOMATIC1111 reads. ``metadata``: more header entries (``modelspec.*``). Each is
    written beside its target and moved in place complete: a failed write leaves the previous ones intact."""
    from safetensors.torch import save_file

    out_path, dtype = Path(out_path), resolve_dtype(dtype)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"out_path must end in .safetensors, got {str(out_path)!r}")
    if pipe.vae is None:
        raise ValueError("the pipeline has no VAE (vae=None: a pixel-space model): Stable Diffusion's single-file "
                         "layout holds latent diffusion models only; save it as a pipeline folder instead")
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    if text_encoder_2 is not None and pipe.text_encoder is None:
        raise ValueError("the SDXL pipeline has no text_encoder (text_encoder=None): SDXL's single-file layout "
                         "holds both text encoders")
    state = layout_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, text_encoder_2)
    if text_encoder_2 is not None:
        state.update(schedule_markers(pipe.scheduler.config))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    configs = config_dir(out_path)
    # the config folder first: a file in place always has its configs (in its metadata and beside it)
    atomic_save_dir(lambda d: write_configs(pipe, Path(d)), configs)
    if text_encoder_2 is None:  # AUTOMATIC1111's and Forge's config beside it: the schedule's prediction type
        _write_original_config(pipe, out_path)
    metadata = {"format": "pt", **folder_metadata(configs), **(metadata or {})}
    atomic_save(lambda p: save_file(state, p, metadata=metadata), out_path)
    return out_path


def _write_original_config(pipe, out_path: Path) -> None:
    """``<stem>.yaml`` beside a Stable Diffusion 1.x/2.x file (`pipelines.ldm_yaml`), or a warning saying why the
    original code (AUTOMATIC1111) cannot build this model."""
    import logging

    import yaml

    from pipelines.ldm_yaml import original_config, yaml_path

    try:
        text = yaml.safe_dump(original_config(pipe), sort_keys=False)
    except ValueError as e:
        logging.getLogger(__name__).warning("no %s beside %s for AUTOMATIC1111: %s", yaml_path(out_path).name,
                                            out_path.name, e)
        return
    atomic_save(lambda p: Path(p).write_text(text, encoding="utf-8"), yaml_path(out_path))


# ---- reading ------------------------------------------------------------------------------------------------

def _from_pickle(path: Path, config: str | Path | None, **kwargs) -> dict:
    """The components of a pickle checkpoint: its tensors (`read_pickle_checkpoint`) written as a temporary
    ``.safetensors`` file and read as one, with the configs of ``config`` or the ``<stem>.config`` folder."""
    from safetensors.torch import save_file

    from pipelines.pickles import read_pickle_checkpoint

    if config is None and (config_dir(path) / "model_index.json").is_file():
        config = config_dir(path)
    with tempfile.TemporaryDirectory(prefix="single-file-ckpt.") as tmp:
        safe = Path(tmp) / f"{path.stem}.safetensors"
        save_file({k: v.contiguous() for k, v in read_pickle_checkpoint(path).items()}, str(safe))
        return load_components(safe, config, **kwargs)

def stored_configs(path: str | Path) -> dict[str, str]:
    """{relative path: text} of the config folder kept in the file's metadata ({} when it keeps none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    files = {k[len(CONFIG_KEY):]: v for k, v in metadata.items() if k.startswith(CONFIG_KEY)}
    return files if "model_index.json" in files else {}  # another tool's entries are no config folder


def _write_folder(files: dict[str, str], folder: Path) -> None:
    for name, text in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"the file's metadata names a config file outside its folder: {name!r}")
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")


def _scheduler(folder: Path):
    """The scheduler model_index.json names, from ``folder``/scheduler (a diffusers scheduler class only)."""
    import diffusers

    _, name = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))["scheduler"]
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"{folder}/model_index.json names scheduler {name!r}, which is not a diffusers scheduler")
    return cls.from_pretrained(folder, subfolder="scheduler")


def _sd_components(path: Path, folder: Path, **kwargs) -> dict:
    from diffusers import StableDiffusionPipeline

    # diffusers' own converter reads the weights. Its StableDiffusionPipeline would rewrite some scheduler
    # settings (steps_offset, clip_sample), so the scheduler is read from the folder as saved.
    sd = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                  scheduler=None, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False, **kwargs)
    return {"vae": sd.vae, "text_encoder": sd.text_encoder, "tokenizer": sd.tokenizer, "unet": sd.unet,
            "scheduler": _scheduler(folder)}


def _same_text_widths(path: Path) -> bool:
    """Whether SDXL's two text encoders in the file are equally wide (diffusers' pipeline loader then reads the
    first one's weights into the second: it tells them apart by width)."""
    from safetensors import safe_open

    first, second = XL_TEXT_PREFIX + "text_model.embeddings.position_embedding.weight", \
        XL_OPEN_CLIP_PREFIX + "positional_embedding"
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        return first in keys and second in keys and \
            f.get_slice(first).get_shape()[-1] == f.get_slice(second).get_shape()[-1]


def _open_clip_encoder(path: Path, folder: Path, torch_dtype=None):
    """SDXL's second text encoder, read by diffusers' OpenCLIP converter from its own weights alone."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection

    with safe_open(str(path), framework="pt") as f:
        own = {k: f.get_tensor(k) for k in f.keys() if k.startswith(XL_OPEN_CLIP_PREFIX)}
    return create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, own, subfolder="text_encoder_2",
                                                config=str(folder), torch_dtype=torch_dtype, local_files_only=True)


def _xl_components(path: Path, folder: Path, **kwargs) -> dict:
    from diffusers import StableDiffusionXLPipeline

    extra = {}
    if _same_text_widths(path):
        extra["text_encoder_2"] = _open_clip_encoder(path, folder, kwargs.get("torch_dtype", kwargs.get("dtype")))
    xl = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                    scheduler=None, **extra, **kwargs)
    return {"vae": xl.vae, "text_encoder": xl.text_encoder, "text_encoder_2": xl.text_encoder_2,
            "tokenizer": xl.tokenizer, "tokenizer_2": xl.tokenizer_2, "unet": xl.unet,
            "scheduler": _scheduler(folder), "force_zeros_for_empty_prompt": xl.config.force_zeros_for_empty_prompt}


def _components_from(path: Path, folder: Path, **kwargs) -> dict:
    """The components of the file's family (read from its keys), configured by ``folder``."""
    from pipelines.families import family_of

    family = family_of(path)
    if family is None:
        raise ValueError(f"{str(path)!r} holds neither Stable Diffusion's U-Net (model.diffusion_model.) with its "
                         f"text encoder (cond_stage_model.) nor SDXL base's with its two (conditioner.embedders.0/1.); "
                         f"an SDXL refiner (one OpenCLIP encoder, conditioner.embedders.0.model.) is not supported")
    folder_family = family_of(folder)
    if folder_family != family:
        raise ValueError(f"{str(path)!r} holds a {family} model and its configs {str(folder)!r} a {folder_family} "
                         f"one: pass config=<a diffusers folder of the file's architecture>")
    return (_xl_components if family == "sdxl" else _sd_components)(path, folder, **kwargs)


def load_components(path: str | Path, config: str | Path | None = None, **kwargs) -> dict:
    """The vae, text_encoder, tokenizer, unet and scheduler of a single file, read by diffusers'
    ``StableDiffusionPipeline.from_single_file``; for a Stable Diffusion XL file (told by its keys) by
    ``StableDiffusionXLPipeline.from_single_file``, with text_encoder_2, tokenizer_2 and
    force_zeros_for_empty_prompt too. ``config`` is a diffusers folder holding the architecture's configs (a
    ``<stem>.config`` folder, or a Stable Diffusion 1.x / XL folder for a file made elsewhere); None uses the
    configs kept in the file's metadata, else the ``<stem>.config`` folder beside it, else configs read from
    the file's keys and shapes (`pipelines.architectures`: Stable Diffusion 1.x, 2.x, XL base). ``kwargs`` go to
    diffusers' loader (e.g. torch_dtype)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a file")
    from pipelines.pickles import PICKLE_SUFFIXES

    if path.suffix in PICKLE_SUFFIXES:
        return _from_pickle(path, config, **kwargs)
    from pipelines.local import check_safetensors

    check_safetensors(path, "the single file")
    if config is not None:
        if not (Path(config) / "model_index.json").is_file():
            raise FileNotFoundError(f"config={str(config)!r} is not a diffusers folder (no model_index.json)")
        return _components_from(path, Path(config), **kwargs)
    files = stored_configs(path)
    if files:
        with tempfile.TemporaryDirectory(prefix="single-file-config.") as tmp:
            _write_folder(files, Path(tmp))
            return _components_from(path, Path(tmp), **kwargs)
    if (config_dir(path) / "model_index.json").is_file():
        return _components_from(path, config_dir(path), **kwargs)
    from pipelines.architectures import write_configs

    with tempfile.TemporaryDirectory(prefix="single-file-config.") as tmp:  # a file from elsewhere: its keys tell
        write_configs(path, Path(tmp))
        return _components_from(path, Path(tmp), **kwargs)
