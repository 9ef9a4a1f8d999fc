"""Train small configurations at a fixed seed on CPU and print the SHA-256 of every exported weight file.

    python bench/export_hashes.py --out runs/export-hashes [--only tiny,ema_accum_flip,...]

A refactor of the training code must leave these hashes unchanged: run this before and after and compare
(`diff` the two JSON files). The configurations cover the tiny preset; EMA + gradient accumulation + flips;
the learned variance; DreamBooth with prior preservation + LoRA on a tiny Stable Diffusion folder built here;
the autoencoder with the PatchGAN switched on mid-run; and, each a few steps, diffusion on pixels, the bound
alone with importance-sampled timesteps, super-resolution stages (random crops with blur; whole images with
flips), a masked loss (cached with flips; random crops encoded every step), textual inversion, and LoRA on the
text encoder and convolutions exported in both layouts and merged. Everything is built in code: nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs/ldm/tiny.yaml"), "train.tensorboard=false"]
LDM_RUNS = {
    "tiny": [],
    "ema_accum_flip": ["train.ema_decay=0.9", "train.gradient_accumulation_steps=2", "data.random_flip=true"],
    "learned_variance": ["diffusion.learned_variance=true", "diffusion.beta_schedule=squaredcos_cap_v2"],
    "pixel_space": ["model.vae=none", "train.max_steps=12"],
    "importance_vlb": ["diffusion.learned_variance=true", "diffusion.loss_type=vlb",
                       "diffusion.timestep_sampling=importance", "diffusion.num_train_timesteps=10",
                       "train.max_steps=20"],
    "super_resolution_crop": ["stage=super_resolution", "super_resolution.low_resolution=8",
                              "super_resolution.noise_levels=[0,100]", "super_resolution.blur_sigma=[0,0.5]",
                              "super_resolution.train_crop=16", "diffusion.timestep_sampling=logit_normal",
                              "train.max_steps=12"],
    "super_resolution_flip": ["stage=super_resolution", "super_resolution.low_resolution=8",
                              "super_resolution.noise_levels=[0,100]", "data.random_flip=true", "train.max_steps=12"],
}
# Runs on a folder of images with masks beside them (`masked_folder`).
MASKED_RUNS = {
    "masked": ["data.mask_source=file", "data.mask_floor=0.1", "data.random_flip=true", "train.max_steps=12"],
    "masked_random_crop": ["data.mask_source=file", "data.random_crop=true", "data.center_crop=false",
                           "train.max_steps=12"],
}
AUTOENCODER = ["--config", str(ROOT / "configs/autoencoder/builtin.yaml"), "export_dir=null", "train.max_steps=12",
               "train.batch_size=8", "train.disc_weight=0.5", "train.disc_start=6", "train.ema_decay=0.9",
               "train.scale_num_images=64", "train.log_every=4", "train.tensorboard=false",
               "model.block_out_channels=[16,32,32]", "model.norm_num_groups=8", "model.latent_channels=4",
               "data.datasets=[shapes,digits]", "train.checkpoint_every=0"]


def sha(path: Path) -> str:
    """SHA-256 of a safetensors file with its JSON header's keys sorted: safetensors writes the header's
    ``__metadata__`` in whatever order its hash map gives, which changes from process to process, so the raw
    bytes of a file with two or more metadata entries (a LoRA file, an AUTOMATIC1111 embedding) differ between
    identical runs. The tensors' bytes and every header value are hashed as written, but for the descriptive
    entries (kohya-ss's ``ss_*`` and Stability's ``modelspec.*``: dates, times, the run's name), which say how a file
    was made, not what it holds."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    meta = header.get("__metadata__") or {}
    if meta:
        header["__metadata__"] = {k: v for k, v in meta.items() if not k.startswith(("ss_", "modelspec."))}
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode() + data[8 + size:]).hexdigest()


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*.safetensors"))}


def run(args: list[str], cwd: Path) -> None:
    # A fixed hash seed: the LoRA file's metadata holds peft's target modules as a set, whose order would
    # change from process to process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-4000:]}")


def tiny_sd_folder(root: Path) -> Path:
    """A tiny Stable Diffusion 1.x folder (v-prediction) with a byte-level tokenizer."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ldm.data.builtin import shapes_caption, shapes_combos
    from ldm.models.text import build_text_encoder, build_tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.0)
    torch.manual_seed(1)
    captions = [shapes_caption(*c) for c in shapes_combos()] + ["a photo of sks blob"]
    # The byte-level alphabet alone (no merges): a tokenizer whose learned merges tie would differ run to run.
    tok = build_tokenizer(captions, vocab_size=514, max_length=32)
    te = build_text_encoder(tok, 32, 1, 2, 64)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 32],
                                layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    sched = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction", clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(
        root, safe_serialization=True)
    return root


def instance_images(folder: Path, n: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # a white blob on grey
        arr = np.full((32, 32, 3), 90, np.uint8)
        arr[8 + i:20 + i, 10:22] = 255
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def masked_folder(folder: Path, n: int = 16) -> Path:
    """Images 40x40 of coloured blocks with captions, each with a ``<name>_mask.png`` covering one block."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        arr = np.full((40, 40, 3), 60, np.uint8)
        mask = np.zeros((40, 40), np.uint8)
        for k in range(2):
            y, x = rng.integers(0, 30, 2)
            arr[y:y + 10, x:x + 10] = rng.integers(30, 255, 3)
            if k == 0:
                mask[y:y + 10, x:x + 10] = 255
        Image.fromarray(arr).save(folder / f"{i}.png")
        Image.fromarray(mask).save(folder / f"{i}_mask.png")
        rows.append({"file_name": f"{i}.png", "text": f"blocks number {i % 4}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def sd_runs(out: Path, common: list[str], only) -> dict:
    """Fine-tuning runs on the tiny Stable Diffusion folder: DreamBooth + LoRA, textual inversion, LoRA merged."""
    wanted = [name for name in ("dreambooth_lora", "textual_inversion", "lora_merged") if only is None or name in only]
    if not wanted:
        return {}
    sd = tiny_sd_folder(out / "sd")
    subject = instance_images(out / "subject")
    base = ["train_ldm.py", *TINY, *common, f"model.pretrained={sd}", "train.learning_rate=0.01",
            "train.batch_size=2", "data.caption_dropout=0.0", f"dreambooth.instance_data={subject}"]
    runs = {
        "dreambooth_lora": (["finetune.method=lora", "finetune.lora_rank=4", "train.max_steps=8",
                             "dreambooth.instance_prompt=a photo of sks blob",
                             "dreambooth.class_prompt=a red circle at the top left",
                             f"dreambooth.class_data={out / 'class_images'}", "dreambooth.num_class_images=4",
                             "dreambooth.class_inference_steps=2", "dreambooth.prior_loss_weight=0.5"], ["lora"]),
        "textual_inversion": (["finetune.method=textual_inversion", "finetune.placeholder_token=<blob>",
                               "finetune.initializer_token=a", "finetune.num_vectors=2", "train.max_steps=6",
                               "dreambooth.instance_prompt=a photo of <blob>"], ["textual_inversion"]),
        "lora_merged": (["finetune.method=lora", "finetune.lora_rank=2", "finetune.lora_alpha=4",
                         "finetune.lora_text_encoder=true", "finetune.lora_conv=true", "finetune.lora_format=both",
                         "finetune.merged_export=true", "finetune.merge_scale=0.5", "train.max_steps=6",
                         "dreambooth.instance_prompt=a photo of sks blob"], ["lora", "pipeline"]),
    }
    result = {}
    for name in wanted:
        extra, folders = runs[name]
        run([*base, f"name={name}", *extra], ROOT)
        result[name] = {(f"{f}/{k}" if len(folders) > 1 else k): v for f in folders
                        for k, v in hashes(out / name / f).items()}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/export-hashes")
    parser.add_argument("--only", default=None, help="comma-separated names of the runs to do")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    common = [f"output_dir={out}", f"data.cache_dir={out / 'cache'}", f"data.data_root={out / 'data'}"]
    result = {}
    for name, extra in LDM_RUNS.items():
        if only is None or name in only:
            run(["train_ldm.py", *TINY, f"name={name}", *common, *extra], ROOT)
            result[name] = hashes(out / name / "pipeline")
    for name, extra in MASKED_RUNS.items():
        if only is None or name in only:
            data = masked_folder(out / "masked-data")
            run(["train_ldm.py", *TINY, f"name={name}", *common, f"data.dataset={data}", *extra], ROOT)
            result[name] = hashes(out / name / "pipeline")
    result.update(sd_runs(out, common, only))
    if only is None or "autoencoder_gan" in only:
        run(["train_autoencoder.py", *AUTOENCODER, "name=autoencoder_gan", f"output_dir={out}",
             f"data.data_root={out / 'data'}"], ROOT)
        result["autoencoder_gan"] = hashes(out / "autoencoder_gan" / "vae")
    (out / "hashes.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
