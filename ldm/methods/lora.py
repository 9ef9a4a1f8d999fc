"""Low-rank adapters (LoRA, Hu et al. 2021) on the U-Net and the text encoder, through peft.

Only the adapter weights train; the base stays frozen and may be kept in bf16/fp16 while the adapters
train in fp32. Adapters are exported as one ``pytorch_lora_weights.safetensors`` in the layout diffusers'
``load_lora_weights`` reads, so ``LDMPipeline`` and diffusers' ``StableDiffusionPipeline`` both load it, and/or
(``finetune.lora_format``) as ``lora_kohya.safetensors`` in kohya-ss's layout for AUTOMATIC1111, ComfyUI and
Forge; optionally merged into a full pipeline folder at a chosen scale.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from ldm.diffusion.schedulers import sampling_scheduler
from ldm.engine.config import Checker
from ldm.methods.base import ExportJob, Method, write_sampling
from ldm.methods.metadata import network_metadata, run_modelspec
from ldm.models.components import pretrained_folder
from pipelines.files import atomic_save_dir

logger = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
# The same adapters in kohya-ss's layout (lora_unet_*/lora_te_* with .lora_down/.lora_up/.alpha), which
# AUTOMATIC1111, ComfyUI and Forge load and diffusers' load_lora_weights converts.
KOHYA_FILE = "lora_kohya.safetensors"
LORA_FORMATS = ("diffusers", "kohya", "both")
LORA_TYPES = ("lora", "loha", "lokr")  # peft's LoraConfig, LoHaConfig, LoKrConfig (`ldm.methods.lycoris`)
# diffusers' attention (to_q/k/v/out.0), its feed-forward (ff.net.0.proj, ff.net.2), and the ResNet convs.
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]
UNET_CONV = ["conv1", "conv2", "conv_shortcut"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unet_targets(fc) -> list[str]:
    """Module names the U-Net's adapters attach to, from ``finetune.lora_*`` switches."""
    return UNET_ATTENTION + (UNET_FEED_FORWARD if fc.lora_feed_forward else []) + (UNET_CONV if fc.lora_conv else [])


def adapter_config(fc, targets: list[str]):
    """The peft config of ``finetune.lora_type`` (and ``lora_dora``) on ``targets``; every kind starts at the base
    model (LoRA and DoRA with a zero B, LoHa and LoKr with a zero factor)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = fc.lora_alpha if fc.lora_alpha is not None else fc.lora_rank
    if fc.lora_type == "loha":
        return LoHaConfig(r=fc.lora_rank, alpha=alpha, module_dropout=fc.lora_dropout, target_modules=targets)
    if fc.lora_type == "lokr":
        return LoKrConfig(r=fc.lora_rank, alpha=alpha, module_dropout=fc.lora_dropout, target_modules=targets)
    return LoraConfig(r=fc.lora_rank, lora_alpha=alpha, lora_dropout=fc.lora_dropout, init_lora_weights="gaussian",
                      target_modules=targets, use_dora=fc.lora_dora)


def adapter_kind(model) -> str:
    """"lora", "dora", "loha" or "lokr": the kind of a peft-adapted model's adapters."""
    config = model.peft_config["default"]
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    return "dora" if kind == "lora" and getattr(config, "use_dora", False) else kind


def add_lora(unet, text_encoders: list, fc) -> list[torch.nn.Parameter]:
    """Freeze the base models, attach adapters (the text encoders' only with ``lora_text_encoder``), cast
    the base to ``finetune.base_dtype`` and the adapters to fp32; return the trainable parameters. The
    settings were checked with the rest of the config (`ldm.trainer.config.check_config`)."""
    alpha = fc.lora_alpha if fc.lora_alpha is not None else fc.lora_rank
    unet.requires_grad_(False)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False)
    base = DTYPES[fc.base_dtype]
    unet.to(dtype=base)
    # The adapted model starts exactly at the base model (a zero factor).
    unet.add_adapter(adapter_config(fc, unet_targets(fc)))
    for text_encoder in text_encoders if fc.lora_text_encoder else []:
        from peft import inject_adapter_in_model

        text_encoder.to(dtype=base)
        # peft directly: transformers 5's `add_adapter` insists on a newer peft than this one needs.
        inject_adapter_in_model(adapter_config(fc, TEXT_ATTENTION), text_encoder)
    from diffusers.training_utils import cast_training_params

    models = [unet, *text_encoders]
    cast_training_params(models, dtype=torch.float32)  # adapters train in fp32 whatever the base
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    n_base = sum(p.numel() for m in models for p in m.parameters()) - sum(p.numel() for p in params)
    logger.info("%s rank %d alpha %s on %s: %.2fM trainable of %.1fM parameters",
                "DoRA" if fc.lora_dora else {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[fc.lora_type], fc.lora_rank, alpha,
                "U-Net + text encoder" if fc.lora_text_encoder else "U-Net",
                sum(p.numel() for p in params) / 1e6, n_base / 1e6)
    return params


def save_lora(folder: str | Path, unet, text_encoder, lora_format: str = "diffusers",
              text_encoder_2=None, metadata=None) -> list[Path]:
    """Write the adapters (U-Net and, when adapted, text-encoder layers; SDXL's second text encoder's too) into
    ``folder``: diffusers' layout (``pytorch_lora_weights.safetensors``), kohya-ss's (``lora_kohya.safetensors``)
    or both. ``metadata(layout)``: more header entries for the file of that layout ("diffusers" or "kohya")."""
    from safetensors.torch import save_file

    from pipelines.sdxl import is_sdxl_unet

    if lora_format not in LORA_FORMATS:
        raise ValueError(f"finetune.lora_format={lora_format!r} is not one of {list(LORA_FORMATS)}")
    sdxl = is_sdxl_unet(unet.config)
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2 if sdxl else None}
    adapted = {name: e for name, e in encoders.items() if e is not None and getattr(e, "peft_config", None)}
    written, kind = [], adapter_kind(unet)
    if lora_format in ("diffusers", "both") and kind in ("loha", "lokr"):  # diffusers reads LoRA and DoRA only
        from ldm.methods.lycoris import save_peft_layout

        written.append(save_peft_layout(Path(folder) / LORA_FILE, {"unet": unet, **adapted},
                                        metadata("diffusers") if metadata is not None else {}))
    elif lora_format in ("diffusers", "both"):
        written.append(_save_diffusers_layout(folder, unet, adapted, sdxl))
        if metadata is not None:
            add_metadata(written[-1], metadata("diffusers"))
    if lora_format in ("kohya", "both") and kind != "lora":
        written.append(_save_lycoris_layout(folder, unet, adapted, sdxl,
                                            metadata("kohya") if metadata is not None else {}))
    elif lora_format in ("kohya", "both"):
        from diffusers.utils import convert_state_dict_to_kohya
        from peft.utils import get_peft_model_state_dict

        peft_sd = {f"unet.{k}": v for k, v in kohya_unet_names(get_peft_model_state_dict(unet), unet.config).items()}
        alphas = {"lora_unet_": unet.peft_config["default"].lora_alpha}
        # kohya names the text encoders' modules from CLIPTextModel's root (text_model.encoder...): lora_te_ for
        # SD 1.x/2.x's one, lora_te1_ / lora_te2_ for SDXL's two
        prefixes = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
        for name, encoder in adapted.items():
            peft_sd.update({f"{name}.{'' if k.startswith('text_model.') else 'text_model.'}{k}": v
                            for k, v in get_peft_model_state_dict(encoder).items()})
            alphas[prefixes[name]] = encoder.peft_config["default"].lora_alpha
        # diffusers' converter names the modules as kohya-ss does, but with SDXL's first-text-encoder prefix
        # (lora_te1_) for SD 1.x too and alpha = rank whatever lora_alpha trained with: both mended here
        kohya = {(k if sdxl else k.replace("lora_te1_", "lora_te_", 1)): v.contiguous()
                 for k, v in convert_state_dict_to_kohya(peft_sd).items()}
        for key in kohya:
            if key.endswith(".alpha"):
                kohya[key] = torch.tensor(float(next(a for p, a in alphas.items() if key.startswith(p))))
        save_file(kohya, str(Path(folder) / KOHYA_FILE),
                  metadata={"format": "pt", **(metadata("kohya") if metadata is not None else {})})
        written.append(Path(folder) / KOHYA_FILE)
    return written


def _save_lycoris_layout(folder, unet, adapted: dict, sdxl: bool, metadata: dict[str, str]) -> Path:
    """LyCORIS's layout of LoHa, LoKr or DoRA adapters (`ldm.methods.lycoris`), under kohya-ss's module names."""
    from safetensors.torch import save_file

    from ldm.methods.lycoris import lycoris_state

    prefixes = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    models = {"lora_unet_": unet, **{prefixes[name]: encoder for name, encoder in adapted.items()}}

    from pipelines.original_layout import original_unet_module

    def rename(module: str, prefix: str) -> str:  # kohya-ss's names, as kohya_unet_names gives them
        if prefix == "lora_unet_":
            return original_unet_module(module, unet.config) if sdxl else module
        return module if module.startswith("text_model.") else f"text_model.{module}"

    state = lycoris_state(models, rename)
    save_file(state, str(Path(folder) / KOHYA_FILE), metadata={"format": "pt", **metadata})
    return Path(folder) / KOHYA_FILE


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Write ``extra`` into a safetensors file's header beside what it holds (the file is rewritten)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        kept, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**kept, **extra})


def _save_diffusers_layout(folder, unet, adapted: dict, sdxl: bool) -> Path:
    """diffusers' layout, the adapters' configs in the metadata: without them diffusers loads alpha = rank (scale
    1) whatever lora_alpha trained with."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
              "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    for name, encoder in adapted.items():
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
        layers[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    saver = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    saver.save_lora_weights(folder, safe_serialization=True, **layers)
    return Path(folder) / LORA_FILE


def kohya_unet_names(state: dict, config) -> dict:
    """The U-Net adapters under the module names kohya-ss's files use: diffusers' for Stable Diffusion 1.x/2.x,
    the original layout's (input_blocks, middle_block, output_blocks) for Stable Diffusion XL, as sd-scripts
    writes them and AUTOMATIC1111, ComfyUI and diffusers' converter read them."""
    from pipelines.sdxl import is_sdxl_unet

    if not is_sdxl_unet(config):
        return state
    from pipelines.original_layout import original_unet_module

    renamed = {}
    for key, value in state.items():
        module, _, rest = key.partition(".lora_")
        renamed[f"{original_unet_module(module, config)}.lora_{rest}"] = value
    return renamed


def lora_file(folder: str | Path) -> Path:
    """The adapters file of a LoRA folder: diffusers' layout if there, else kohya's."""
    for name in (LORA_FILE, KOHYA_FILE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"{str(folder)!r} holds neither {LORA_FILE} nor {KOHYA_FILE}")


_MODULE_KEY = re.compile(r"^(.*?)(?:\.lora_A|\.lora_down|\.lora\.down|_lora\.down)(?:\.[^.]+)?\.weight$")


def file_modules(path: str | Path) -> list[str]:
    """The modules a LoRA file adapts, as the file names them (one per down/A matrix; peft's, diffusers' older
    and kohya's layouts)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sorted({m.group(1) for m in map(_MODULE_KEY.match, f.keys()) if m})


def adapted_modules(pipe, adapter: str) -> list[str]:
    """The modules of ``pipe``'s denoiser and text encoders that carry ``adapter``, as "component.module"."""
    out = []
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        out += [f"{component}.{name}" for name, m in model.named_modules()
                if adapter in getattr(m, "lora_A", {}) or adapter in getattr(m, "lora_down", {})]
    return out


def _plain(module: str) -> str:
    """A module name without its component prefix, "." as "_": peft's and kohya's names of one module agree."""
    module = re.sub(r"^(unet|transformer|text_encoder(_2)?)\.|^lora_(unet|te\d?)_", "", module)
    return module.replace(".", "_")


def load_lora_checked(pipe, folder: str | Path, weight_name: str) -> str:
    """``pipe.load_lora_weights``, then the check diffusers leaves out: every module the file adapts must have
    been found in the pipeline. A file for another architecture, or a hand-edited one, otherwise loads the few
    modules whose names happen to match and drops the rest without a word. Refused (the adapter removed again)
    naming the modules not found; returns the adapter's name."""
    path = Path(folder) / weight_name
    before = {a for names in pipe.get_list_adapters().values() for a in names}
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    adapter = next(a for names in pipe.get_list_adapters().values() for a in names if a not in before)
    wanted, found = file_modules(path), adapted_modules(pipe, adapter)
    if len(found) < len(wanted):
        pipe.delete_adapters(adapter)
        have = {_plain(f) for f in found}
        unused = [w for w in wanted if _plain(w) not in have]
        raise ValueError(f"LoRA {str(path)!r} adapts {len(wanted)} modules and only {len(found)} exist in this "
                         f"pipeline (a file for another model?); not found: {unused[:8]}"
                         + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    return adapter


def merge_into(pipe, lora_dir: str | Path, scale: float = 1.0):
    """Load the adapters of ``lora_dir`` into ``pipe``, fuse them at ``scale`` and drop the adapter modules,
    leaving a plain pipeline whose weights include the update (LoHa and LoKr through peft, the others through
    diffusers' loader)."""
    from ldm.methods.lycoris import merge_adapters, peft_layout_configs

    if peft_layout_configs(lora_file(lora_dir)) is not None:
        return merge_adapters(pipe, lora_file(lora_dir), scale)
    load_lora_checked(pipe, lora_dir, lora_file(lora_dir).name)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe


class LoRA(Method):
    """Low-rank adapters on the U-Net (and, with ``finetune.lora_text_encoder``, the text encoder); the base stays
    frozen. Exports the adapters (``<run>/lora``) and, with ``finetune.merged_export``, the base with them merged
    at ``finetune.merge_scale`` (``<run>/pipeline``)."""

    families = ("sd", "sdxl")  # SDXL: the U-Net's adapters (`ldm.trainer.sdxl` refuses the text encoders')

    def check(self, c: Checker) -> None:
        cfg = c.cfg
        fc, tc = cfg.finetune, cfg.train
        c.require(bool(cfg.model.pretrained), "finetune.method",
                  "lora needs model.pretrained: the model whose weights the adapters adapt")
        c.at_least("finetune.lora_rank", 1)
        c.positive("finetune.lora_alpha", optional=True)
        c.within("finetune.lora_dropout", 0, 1)
        c.require(math.isfinite(fc.merge_scale), "finetune.merge_scale", "needs a finite number")
        c.require(not (fc.lora_dora and fc.lora_type != "lora"), "finetune.lora_dora",
                  f"DoRA is LoRA's: it needs finetune.lora_type=lora, got {fc.lora_type!r}")
        c.require(not (fc.lora_type != "lora" and fc.merged_export and fc.lora_format == "kohya"),
                  "finetune.lora_format", f"a {fc.lora_type} adapter merges from peft's layout: 'diffusers' or 'both' "
                                          f"with finetune.merged_export=true")
        c.require(fc.base_dtype in ("fp32", tc.mixed_precision), "finetune.base_dtype",
                  f"{fc.base_dtype!r} needs train.mixed_precision={fc.base_dtype!r} (got {tc.mixed_precision!r}) so "
                  f"that inputs meet the base weights in that dtype; or fp32")
        c.require(not (cfg.diffusion.pretrained_schedule == "config" and not fc.merged_export),
                  "diffusion.pretrained_schedule",
                  "'config' with LoRA needs finetune.merged_export=true: a LoRA file carries no schedule, so loaded "
                  "on the base model it would be sampled with the base's")

    def trainable(self, cfg, comp) -> list[dict]:
        comp.train_text_encoder = cfg.finetune.lora_text_encoder
        return [{"params": add_lora(comp.unet, comp.text_encoders(), cfg.finetune), "lr": cfg.train.learning_rate}]

    def export(self, job: ExportJob) -> dict[str, Path]:
        cfg, run_dir = job.cfg, job.run_dir
        fc = cfg.finetune
        def metadata(layout: str) -> dict[str, str]:
            implementation = "diffusers" if layout == "diffusers" else "https://github.com/kohya-ss/sd-scripts"
            return {**run_modelspec(cfg, job.comp, "lora", implementation), **job.metadata, **network_metadata(fc)}

        atomic_save_dir(lambda d: (save_lora(d, job.unet, job.text_encoder, fc.lora_format, job.comp.text_encoder_2,
                                             metadata), write_sampling(d, cfg, job.prompts)), run_dir / "lora")
        saved = {"lora": lora_file(run_dir / "lora")}
        if (run_dir / "lora" / KOHYA_FILE).is_file() and saved["lora"].name != KOHYA_FILE:  # lora_format=both
            saved["lora (kohya layout)"] = run_dir / "lora" / KOHYA_FILE
        if fc.merged_export:
            from pipelines import LDMPipeline

            merged = merge_into(LDMPipeline.from_pretrained(pretrained_folder(cfg)), run_dir / "lora", fc.merge_scale)
            merged.scheduler = sampling_scheduler(job.comp.scheduler, cfg.sample.scheduler)
            atomic_save_dir(lambda d: (merged.save_pretrained(d, safe_serialization=True), write_sampling(d, cfg, job.prompts)),
                            run_dir / "pipeline")
            saved["pipeline"] = run_dir / "pipeline"
        return saved
