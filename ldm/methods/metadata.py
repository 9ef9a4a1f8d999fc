"""What a run writes into the header of the files it shares, so that other tools can say what a file is and how it
was made: Stability's ``modelspec.*`` entries (`pipelines.modelspec`) and kohya-ss's ``ss_*`` training entries
(the network module, rank and alpha, base model version, learning rates, steps, resolution, the datasets' folders
with their repeats and image counts, and every tag's frequency), which AUTOMATIC1111's LoRA cards and model sites
show. Every value is a string, as the safetensors header wants."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from pipelines.latents import vae_scale_factor
from pipelines.modelspec import base_architecture, modelspec

BASE_MODEL_VERSIONS = {"stable-diffusion-v1": "sd_v1", "stable-diffusion-v2-512": "sd_v2",
                       "stable-diffusion-v2-768-v": "sd_v2", "stable-diffusion-xl-v1-base": "sdxl_base_v1-0"}


def dataset_summary(cfg, split) -> tuple[dict, dict]:
    """({folder: {"n_repeats", "img_count"}}, {folder: {tag: count}}) of the training images, by source (the
    ``data.sources`` entries, else ``data.dataset``); tags are a caption's comma-separated parts."""
    d = cfg.data
    names = [Path(e.dataset).name or e.dataset for e in d.sources] or [Path(d.dataset).name or d.dataset]
    dirs, tags = {}, {}
    for i in range(len(split)):
        name = names[int(split.sources[i]) if split.sources is not None else 0]
        entry = dirs.setdefault(name, {"n_repeats": 0.0, "img_count": 0})
        entry["img_count"] += 1
        entry["n_repeats"] += float(split.repeats[i]) if split.repeats is not None else 1.0
        counts = tags.setdefault(name, Counter())
        for caption in split.captions[split.caption_start[i]:split.caption_start[i + 1]]:
            counts.update(t.strip() for t in caption.split(",") if t.strip())
    for entry in dirs.values():  # the mean repeats of the folder's images (kohya-ss: one number per folder)
        n = entry["n_repeats"] / entry["img_count"]
        entry["n_repeats"] = int(n) if n == int(n) else round(n, 3)
    return dirs, {name: dict(c) for name, c in tags.items()}


def training_metadata(cfg, comp, split, steps: int, started: float | None = None) -> dict[str, str]:
    """kohya-ss's ``ss_*`` entries of a run that trained ``steps`` steps on ``split``."""
    tc, d, dif = cfg.train, cfg.data, cfg.diffusion
    arch = base_architecture(comp.unet.config, comp.scheduler.config)
    dirs, tags = dataset_summary(cfg, split)
    values = {
        "ss_output_name": cfg.name, "ss_session_id": str(abs(hash((cfg.name, started))) % 2**31),
        "ss_training_started_at": started, "ss_training_finished_at": time.time(),
        "ss_sd_model_name": Path(cfg.model.pretrained).name if cfg.model.pretrained else "(trained from scratch)",
        "ss_base_model_version": BASE_MODEL_VERSIONS[arch], "ss_v2": arch.startswith("stable-diffusion-v2"),
        "ss_v_parameterization": comp.scheduler.config.get("prediction_type") == "v_prediction",
        "ss_learning_rate": tc.learning_rate, "ss_unet_lr": tc.learning_rate,
        "ss_text_encoder_lr": tc.text_encoder_learning_rate or tc.learning_rate,
        "ss_max_train_steps": tc.max_steps, "ss_steps": steps, "ss_seed": tc.seed,
        "ss_total_batch_size": tc.batch_size, "ss_gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "ss_optimizer": tc.optimizer, "ss_lr_scheduler": tc.lr_schedule, "ss_lr_warmup_steps": tc.warmup_steps,
        "ss_mixed_precision": tc.mixed_precision, "ss_max_grad_norm": tc.max_grad_norm,
        "ss_resolution": str((d.resolution, d.resolution)), "ss_enable_bucket": d.bucketing,
        "ss_num_train_images": len(split), "ss_caption_dropout_rate": d.caption_dropout,
        "ss_shuffle_caption": d.shuffle_tags, "ss_keep_tokens": d.keep_tokens,
        "ss_caption_tag_dropout_rate": d.tag_dropout, "ss_flip_aug": d.random_flip, "ss_random_crop": d.random_crop,
        "ss_noise_offset": dif.offset_noise, "ss_min_snr_gamma": dif.snr_gamma,
        "ss_ip_noise_gamma": dif.input_perturbation, "ss_debiased_estimation": dif.debiased_estimation,
        "ss_min_timestep": dif.min_timestep, "ss_max_timestep": dif.max_timestep,
        "ss_loss_type": dif.distance, "ss_huber_c": dif.huber_c,
        "ss_dataset_dirs": json.dumps(dirs), "ss_tag_frequency": json.dumps(tags),
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def network_metadata(fc) -> dict[str, str]:
    """kohya-ss's entries of a LoRA network: its module, rank, alpha, dropout, whether the text encoder trained."""
    plain = fc.lora_type == "lora" and not fc.lora_dora
    values = {"ss_network_module": "networks.lora" if plain else "lycoris.kohya", "ss_network_dim": fc.lora_rank,
              "ss_network_alpha": fc.lora_alpha if fc.lora_alpha is not None else fc.lora_rank,
              "ss_network_dropout": fc.lora_dropout, "ss_network_train_unet_only": not fc.lora_text_encoder}
    if not plain:  # LyCORIS's arguments: the algorithm, and DoRA's weight decomposition
        values["ss_network_args"] = json.dumps({"algo": fc.lora_type, **({"dora_wd": "True"} if fc.lora_dora else {})})
    return {k: str(v) for k, v in values.items()}


def run_modelspec(cfg, comp, adapter: str | None, implementation: str | None = None) -> dict[str, str]:
    """The ``modelspec.*`` entries of what a run exports (its model, or a LoRA or textual inversion of it)."""
    trigger = cfg.finetune.placeholder_token if adapter == "textual-inversion" else (
        cfg.dreambooth.instance_prompt or None)
    return modelspec(comp.unet.config, comp.scheduler.config, vae_scale_factor(comp.vae), cfg.name, adapter,
                     implementation, trigger_phrase=trigger, resolution=(cfg.data.resolution, cfg.data.resolution))
