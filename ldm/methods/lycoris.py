"""Adapters beyond plain LoRA, trained through peft: LoHa (a Hadamard product of two low-rank products), LoKr (a
Kronecker product) and DoRA (LoRA with each output row's magnitude learned apart from its direction), and the
files other tools read them from.

- LyCORIS's layout (``lora_kohya.safetensors``, as sd-scripts and LyCORIS write it and AUTOMATIC1111, ComfyUI and
  Forge load it): per adapted module ``lora_unet_<module>`` (``lora_te_...`` for the text encoder) with
  ``hada_w1_a``/``hada_w1_b``/``hada_w2_a``/``hada_w2_b``, ``lokr_w1``[``_a``/``_b``]/``lokr_w2``[``_a``/``_b``], or
  ``lora_down``/``lora_up`` with ``dora_scale`` (each output row's magnitude), and ``alpha``. The adapter's
  scale (alpha / rank) is folded into its last factor and ``alpha`` written equal to the rank, so that every
  reader applies scale 1: readers disagree about how a LoHa's alpha scales (LyCORIS 4.1's own merge applies it
  twice), and a LoKr without a low-rank factor ignores it.
- peft's layout for LoHa and LoKr (``pytorch_lora_weights.safetensors``: ``unet.<peft name>``, and
  ``text_encoder.<peft name>``; the adapter configs in the header as ``lora_adapter_metadata``), which peft's
  ``set_peft_model_state_dict`` reads and `merge_adapters` merges; diffusers' LoRA loader reads LoRA and DoRA only,
  so a DoRA adapter is written in diffusers' own layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PEFT_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                 "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "lora_A.weight", "lora_B.weight",
                 "lora_magnitude_vector")
ADAPTER_METADATA = "lora_adapter_metadata"  # the header entry of the peft layout: {model: its adapter config}


def peft_modules(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """A peft adapter state dict ({``<module>.<parameter>``: tensor}) grouped by module."""
    modules = {}
    for key, value in state.items():
        suffix = next((s for s in PEFT_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"adapter weight {key!r} is none of LoRA's, DoRA's, LoHa's or LoKr's")
        modules.setdefault(key[:-len(suffix) - 1], {})[suffix] = value
    return modules


def lycoris_module(params: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """One module's LyCORIS entries (without its name) from its peft parameters, the scale folded in."""
    if "hada_w1_a" in params:
        out = {**params, "hada_w1_a": params["hada_w1_a"] * scale}
        rank = params["hada_w1_b"].shape[0]
    elif any(k.startswith("lokr_") for k in params):
        last = "lokr_w2" if "lokr_w2" in params else "lokr_w2_a"
        out = {**params, last: params[last] * scale}
        rank = next((params[k].shape[1] for k in ("lokr_w2_a", "lokr_w1_a") if k in params), 1)
    else:
        down = params["lora_A.weight"]
        out = {"lora_down.weight": down, "lora_up.weight": params["lora_B.weight"] * scale}
        if "lora_magnitude_vector" in params:  # per output row, as LyCORIS's dora_scale with wd_on_out
            out["dora_scale"] = params["lora_magnitude_vector"].reshape(-1).reshape(-1, *[1] * (down.dim() - 1))
        rank = down.shape[0]
    return {**{k: v.detach().float().contiguous() for k, v in out.items()}, "alpha": torch.tensor(float(rank))}


def lycoris_state(models: dict[str, tuple[object, str]], rename=None) -> dict[str, torch.Tensor]:
    """The LyCORIS layout of adapted models {prefix ("lora_unet_", "lora_te_", ...): (model, kind)}; ``rename(module,
    prefix)`` gives a module's name in the file (default: its own)."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for prefix, model in models.items():
        config = model.peft_config["default"]
        alpha = getattr(config, "lora_alpha", None) or getattr(config, "alpha")
        for module, params in peft_modules(get_peft_model_state_dict(model)).items():
            name = prefix + (rename(module, prefix) if rename is not None else module).replace(".", "_")
            out.update({f"{name}.{k}": v for k, v in lycoris_module(params, alpha / config.r).items()})
    return out


def save_peft_layout(path: Path, models: dict[str, object], metadata: dict[str, str]) -> Path:
    """peft's layout of adapted models {"unet": ..., "text_encoder": ...} (see the module docstring)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {f"{name}.{k}": v.detach().contiguous() for name, model in models.items()
             for k, v in get_peft_model_state_dict(model).items()}
    configs = {name: _config_dict(model.peft_config["default"]) for name, model in models.items()}
    save_file(state, str(path), metadata={"format": "pt", ADAPTER_METADATA: json.dumps(configs), **metadata})
    return path


def _config_dict(config) -> dict:
    out = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in out.items()}


def peft_layout_configs(path: Path) -> dict | None:
    """{model: peft config} of a LoHa or LoKr file in peft's layout, or None for any other file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        configs = json.loads((f.metadata() or {}).get(ADAPTER_METADATA, "{}"))
    if not isinstance(configs, dict) or not configs or not all(
            isinstance(c, dict) and c.get("peft_type") in ("LOHA", "LOKR") for c in configs.values()):
        return None
    return configs


def merge_adapters(pipe, path: Path, scale: float = 1.0):
    """Merge a peft-layout LoHa or LoKr file into ``pipe``'s models at ``scale`` and drop the adapter modules."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    state = load_file(str(path))
    for name, raw in peft_layout_configs(path).items():
        model = getattr(pipe, name)
        config = (LoHaConfig if raw["peft_type"] == "LOHA" else LoKrConfig)(
            **{k: v for k, v in raw.items() if k in ("r", "alpha", "target_modules", "rank_dropout", "module_dropout",
                                                     "use_effective_conv2d", "decompose_both", "decompose_factor")})
        inject_adapter_in_model(config, model, adapter_name="merge")
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        set_peft_model_state_dict(model, own, adapter_name="merge")
        for module in list(model.modules()):
            if isinstance(module, BaseTunerLayer):
                module.scale_layer(scale)
                module.merge(adapter_names=["merge"])
        _unwrap(model)
    return pipe


def _unwrap(model) -> None:
    """Replace every adapter layer of ``model`` by its (merged) base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
