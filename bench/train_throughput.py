"""Training throughput of this project's trainer against a loop written the way diffusers' example does it.

Both sides train the same U-Net architecture, with the same VAE, text encoder, tokenizer, data, global batch,
mixed precision and number of steps, one after the other in this process:

- **ours**: ``ldm.trainer.train.train(cfg)`` with a frozen text encoder. It encodes every image with the VAE once (the
  posterior mean and std, memory-mapped from ``data.cache_dir``) and every caption with the text encoder once,
  then each step draws z0 from the cached posterior and trains the U-Net alone. Its steady-state images/s is the
  mean of ``images_per_s`` over the metrics.jsonl rows after the first ``--warmup`` steps; the one-off cost of the
  caches is reported beside it.
- **diffusers-style**: the loop of diffusers' ``examples/text_to_image/train_text_to_image.py``: a DataLoader over
  the image files (resize, center crop, to tensor, normalise to [-1, 1], tokenised caption), and per step
  ``vae.encode(pixels).latent_dist.sample() * scaling_factor``, uniform timesteps, ``DDPMScheduler.add_noise``,
  ``text_encoder(input_ids)[0]``, U-Net forward, MSE against the noise, ``accelerator.backward``, gradient
  clipping, AdamW (fused on CUDA, as ours) with ours' learning-rate schedule, ``zero_grad``. VAE and text encoder
  are frozen and cast to the mixed-precision dtype, and the loss is gathered and read each step, as the example
  does. Its images/s is the mean over windows of the same length as ours' log rows, after the same warm-up.
  ``--num-workers`` sets its DataLoader workers (and ours' for the one-off caching): 0 for cpu-tiny, where a
  worker would take one of the two cores the step uses; 4 for sd15, as one would run the example on a GPU host.

- **diffusers tuned**: diffusers' components trained the way one tunes that loop by hand (what
  ``shared/bench/diffusers_baseline.py`` measured on an H100 as 108 img/s at batch 16): latents and caption
  embeddings computed once up front and kept on the device, fused AdamW, the whole U-Net ``torch.compile``d
  (on CUDA; ``--tuned-compile``), autocast, no loss read back in the loop.

The ratios printed and saved are ours / diffusers-style and ours / diffusers tuned (above 1: ours trains more
images per second), with each side's warm-up seconds (its first ``--warmup`` steps, compilation included).
``--compile`` and ``--channels-last`` set ours' switches (default: the trainer's "auto").

    OMP_NUM_THREADS=2 python bench/train_throughput.py --preset cpu-tiny          # about two minutes on 2 cores
    python bench/train_throughput.py --preset sd15 --out sd15.json                # on one GPU

``sd15`` builds Stable Diffusion 1.5's U-Net (860M parameters), an SD-architecture VAE and a CLIP-L-size text
encoder with random weights, generates the built-in shapes at 512 px into a temporary folder, and trains in bf16
with batch 8; flags override any of it (``--batch-size 16 --steps 40``). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built from a config; never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/train_throughput.py` from a checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.data.builtin import generate_shapes  # noqa: E402
from ldm.data.sources import captions_of  # noqa: E402
from ldm.data.splits import load_splits  # noqa: E402
from ldm.engine.config import LR_SCHEDULES, load_config  # noqa: E402
from ldm.engine.records import read_metrics  # noqa: E402
from ldm.models.components import build_components  # noqa: E402
from ldm.models.text import tokenize  # noqa: E402
from ldm.trainer.config import LDMConfig  # noqa: E402
from ldm.trainer.train import train  # noqa: E402

SD15_UNET = [
    "model.unet.block_out_channels=[320, 640, 1280, 1280]",
    "model.unet.down_block_types=[CrossAttnDownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D]",
    "model.unet.up_block_types=[UpBlock2D, CrossAttnUpBlock2D, CrossAttnUpBlock2D, CrossAttnUpBlock2D]",
    "model.unet.layers_per_block=2",
    "model.unet.attention_head_dim=8",
    "model.unet.norm_num_groups=32",
]
# CLIP ViT-L/14's text tower. The vocabulary is learned from the captions, so `vocab_size` is only an upper bound:
# the embedding table is smaller than CLIP's 49408 rows, which changes nothing but one lookup.
CLIP_L_TEXT = [
    "model.text_encoder.hidden_size=768",
    "model.text_encoder.num_hidden_layers=12",
    "model.text_encoder.num_attention_heads=12",
    "model.text_encoder.intermediate_size=3072",
    "model.text_encoder.max_length=77",
    "model.text_encoder.vocab_size=49408",
]
SD_SCHEDULE = ["diffusion.num_train_timesteps=1000", "diffusion.beta_schedule=scaled_linear",
               "diffusion.beta_start=0.00085", "diffusion.beta_end=0.012", "diffusion.prediction_type=epsilon"]

# num_images=None: the built-in `shapes` dataset as the trainer generates it (6000 images); else that many
# shapes images generated into a temporary folder at `resolution`.
PRESETS = {
    "cpu-tiny": {
        "yaml": ROOT / "configs/ldm/shapes.yaml",  # the demo's U-Net and text encoder, the shipped VAE, 32 px
        "overrides": [],
        "resolution": 32, "num_images": None, "sd_vae": False,
        "steps": 20, "warmup": 5, "batch_size": 32, "mixed_precision": "no",
        "num_workers": 0,  # 2 cores: a loader process would take a core from the training step
    },
    "sd15": {
        "yaml": None,
        "overrides": [*SD15_UNET, *CLIP_L_TEXT, *SD_SCHEDULE, "train.learning_rate=0.00001"],
        "resolution": 512, "num_images": 512, "sd_vae": True,
        "steps": 30, "warmup": 5, "batch_size": 8, "mixed_precision": "bf16",
        "num_workers": 4,  # image decoding off the training process, as one would run the example on a GPU
    },
}

# ----------------------------------------------------------------------------------------------
# 1. Inputs: data, VAE and the config both sides are built from
# ----------------------------------------------------------------------------------------------

def make_sd_vae(folder: Path) -> Path:
    """A randomly initialised AutoencoderKL of Stable Diffusion's architecture (f=8, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
                        scaling_factor=0.18215)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def log_every_for(steps: int, warmup: int, min_rows: int = 4) -> int:
    """The longest log window that divides both the warm-up and the timed steps and gives ``min_rows``
    timed windows (else 1), so the warm-up ends on a window boundary."""
    g = math.gcd(warmup, steps)
    fits = [d for d in range(1, g + 1) if g % d == 0 and steps // d >= min_rows]
    return max(fits) if fits else 1


def make_config(args: argparse.Namespace, tmp: Path, dataset: str, vae: str, log_every: int) -> LDMConfig:
    """The preset's config with what the comparison needs: a frozen text encoder, no checkpoints, no
    validation beyond the trainer's fixed start/end ones (made cheap), a fresh run and cache folder."""
    preset = PRESETS[args.preset]
    first_caption = "a red circle at the top left"  # a shapes caption for the final sample
    return load_config(LDMConfig, preset["yaml"], [
        *preset["overrides"],
        "name=ours", f"output_dir={tmp / 'runs'}",
        f"data.dataset={dataset}", f"data.data_root={ROOT / 'data'}", f"data.resolution={args.resolution}",
        f"data.cache_dir={tmp / 'cache'}", f"data.validation_num_images={min(args.batch_size, 16)}",
        "data.cache_latents=true", "data.cache_text=true", "data.random_crop=false", "data.random_flip=false",
        "data.bucketing=false", "data.center_crop=true",
        f"model.vae={vae}", "model.train_text_encoder=false",
        f"train.batch_size={args.batch_size}", f"train.max_steps={args.warmup + args.steps}",
        f"train.mixed_precision={args.mixed_precision}",
        f"train.log_every={log_every}",
        f"train.num_workers={args.num_workers}", "train.gradient_accumulation_steps=1",
        "train.checkpoint_every=0", "train.validate_every=0", "train.score_num_images=0",
        "train.tensorboard=false", "train.ema_decay=null", "train.gradient_checkpointing=false",
        f"train.compile={args.compile}", f"train.channels_last={args.channels_last}",
        f"sample.prompts=[{first_caption}]", "sample.seeds=[0]", "sample.num_inference_steps=2",
    ])


# ----------------------------------------------------------------------------------------------
# 2. Ours: the project's trainer, from caches
# ----------------------------------------------------------------------------------------------

class _CacheTimes(logging.Handler):
    """Collects when ``ldm.data.cache`` reports a cache built (or reused)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(("built", "reusing")):
            self.times.append(record.created)


@contextlib.contextmanager
def cache_times():
    log = logging.getLogger("ldm.data.cache")
    handler, level = _CacheTimes(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler.times
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def run_ours(cfg: LDMConfig, warmup: int) -> dict:
    """Steady-state images/s of ``train(cfg)`` from its metrics rows, and what the caches cost up front."""
    with cache_times() as cached_at:
        start = time.time()
        result = train(cfg)
        wall = time.time() - start
    every = cfg.train.log_every
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "epoch" in r]
    timed = [r["images_per_s"] for r in rows if r["step"] - every >= warmup]  # windows wholly after warm-up
    if not timed:
        raise RuntimeError(f"no metrics row after the {warmup} warm-up steps (log_every={every}); "
                           f"rows at steps {[r['step'] for r in rows]}")
    # All steps, warm-up included, summed over the log windows (train()'s own train_time_s is rounded).
    ends = [r["step"] for r in rows]
    loop_s = sum((end - begin) * cfg.train.batch_size / r["images_per_s"]
                 for begin, end, r in zip([0, *ends[:-1]], ends, rows))
    warm_s = sum((end - begin) * cfg.train.batch_size / r["images_per_s"]
                 for begin, end, r in zip([0, *ends[:-1]], ends, rows) if end <= warmup)
    return {
        "images_per_s": round(float(np.mean(timed)), 2),
        "warmup_steps_s": round(warm_s, 2),  # the warm-up steps (compilation included)
        "window_images_per_s": [round(v, 2) for v in timed],
        "final_loss": result.get("final_loss"),
        "train_wall_s": round(wall, 2),
        "loop_s": round(loop_s, 2),
        # From train()'s start to the last cache written: data loading, model building, fingerprints, VAE and
        # text-encoder passes over the data. None if the cache module's log line changed.
        "setup_and_cache_s": round(cached_at[-1] - start, 2) if cached_at else None,
        # Everything but the steps: the above, the start/end validation, the final sample and the export.
        "outside_loop_s": round(wall - loop_s, 2),
    }


# ----------------------------------------------------------------------------------------------
# 3. Diffusers-style: encode everything on every step
# ----------------------------------------------------------------------------------------------

class ExampleImages(torch.utils.data.Dataset):
    """The example's preprocessing of an image-caption dataset: resize the short side (bilinear), center crop,
    to tensor, normalise to [-1, 1]; the caption tokenised to the tokenizer's length."""

    def __init__(self, ds, image_column: str, caption_column: str, resolution: int, tokenizer):
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.resolution, self.tokenizer = resolution, tokenizer

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[int(i)]
        image = row[self.image_column].convert("RGB")
        r = self.resolution
        scale = r / min(image.size)
        if scale != 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - r) // 2, (image.height - r) // 2
        image = image.crop((left, top, left + r, top + r))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, r, r)
        caption = captions_of(row[self.caption_column])[0]
        return {"pixel_values": (pixels - 0.5) / 0.5, "input_ids": tokenize(self.tokenizer, [caption])[0]}


def update(accelerator, loss: torch.Tensor, unet, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    """The example's update: backward, gradient clipping, optimizer and schedule step, zeroed gradients."""
    accelerator.backward(loss)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def example_setup(cfg: LDMConfig) -> tuple:
    """(accelerator, components, the example's dataset, the frozen models' dtype) as the example sets them up,
    on the components ``train(cfg)`` builds: the same images, captions, architectures and tokenizer as ours;
    VAE and text encoder frozen in the mixed-precision dtype, the U-Net in training mode."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tc = cfg.train
    accelerator = Accelerator(mixed_precision=tc.mixed_precision)
    set_seed(tc.seed)
    train_split, _, _ = load_splits(cfg)
    comp = build_components(cfg, train_split.captions)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.mixed_precision, torch.float32)
    comp.vae.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    comp.text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    comp.unet.train()
    data = ExampleImages(train_split.ds, cfg.data.image_column, cfg.data.caption_column, cfg.data.resolution,
                         comp.tokenizer)
    return accelerator, comp, data, weight_dtype


def example_optimizer(unet, tc, fused) -> tuple:
    """AdamW with ours' settings and ours' learning-rate schedule, so the losses compare."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.weight_decay, fused=fused)
    return optimizer, get_scheduler(LR_SCHEDULES[tc.lr_schedule], optimizer, num_warmup_steps=tc.warmup_steps,
                                    num_training_steps=tc.max_steps)


def run_diffusers_style(cfg: LDMConfig, warmup: int, num_workers: int) -> dict:
    """Images/s of the example's step on the components ``train(cfg)`` builds, over windows of
    ``cfg.train.log_every`` steps after ``warmup`` steps."""
    tc = cfg.train
    accelerator, comp, data, weight_dtype = example_setup(cfg)
    device = accelerator.device
    vae, text_encoder, unet, noise_scheduler = comp.vae, comp.text_encoder, comp.unet, comp.scheduler
    batch = tc.batch_size // accelerator.num_processes
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=num_workers, persistent_workers=num_workers > 0)
    optimizer, lr_scheduler = example_optimizer(unet, tc, fused=device.type == "cuda" or None)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    scaling = vae.config.scaling_factor
    num_t = noise_scheduler.config.num_train_timesteps

    def step(b: dict) -> float:
        latents = vae.encode(b["pixel_values"].to(weight_dtype)).latent_dist.sample() * scaling  # (B, C, h, w)
        noise = torch.randn_like(latents)
        t = torch.randint(0, num_t, (len(latents),), device=latents.device).long()
        noisy = noise_scheduler.add_noise(latents, noise, t)
        context = text_encoder(b["input_ids"], return_dict=False)[0]  # (B, L, D)
        pred = unet(noisy, t, context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        value = accelerator.gather(loss.repeat(len(latents))).mean().item()  # the example logs every step
        update(accelerator, loss, unet, optimizer, lr_scheduler, tc.max_grad_norm)
        return value

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    every, total = tc.log_every, tc.max_steps
    rates, done, losses = [], 0, []
    t_window = time.time()
    while done < total:
        for b in loader:
            losses.append(step(b))
            done += 1
            if done % every == 0:
                sync()
                now = time.time()
                if done - every >= warmup:
                    rates.append(every * tc.batch_size / (now - t_window))
                t_window = now
            if done >= total:
                break
    accelerator.free_memory()
    if not rates:
        raise RuntimeError(f"no timed window after the {warmup} warm-up steps (log_every={every})")
    return {"images_per_s": round(float(np.mean(rates)), 2), "window_images_per_s": [round(v, 2) for v in rates],
            "final_loss": round(losses[-1], 5), "num_workers": num_workers}


# ----------------------------------------------------------------------------------------------
# 4. Diffusers tuned by hand: cached inputs, fused AdamW, the whole U-Net compiled
# ----------------------------------------------------------------------------------------------

def run_diffusers_tuned(cfg: LDMConfig, warmup: int, compile_unet: bool) -> dict:
    """Images/s of diffusers' components trained as one would tune the example by hand (as
    ``shared/bench/diffusers_baseline.py`` measured it): every image's latents and caption embedding computed
    once up front and kept on the device, fused AdamW, ``torch.compile`` of the whole U-Net (``compile_unet``),
    autocast, the loss never read back during the loop. Same components, data, batch and schedule as ours."""
    tc = cfg.train
    accelerator, comp, data, weight_dtype = example_setup(cfg)
    device = accelerator.device
    vae, text_encoder, unet, noise_scheduler = comp.vae, comp.text_encoder, comp.unet, comp.scheduler
    t0 = time.time()
    latents, contexts = [], []
    with torch.no_grad():
        for b in torch.utils.data.DataLoader(data, batch_size=tc.batch_size):
            latents.append(vae.encode(b["pixel_values"].to(device, weight_dtype)).latent_dist.sample()
                           * vae.config.scaling_factor)
            contexts.append(text_encoder(b["input_ids"].to(device), return_dict=False)[0])
    latents, contexts = torch.cat(latents), torch.cat(contexts)
    cache_s = time.time() - t0
    vae.to("cpu"), text_encoder.to("cpu")
    optimizer, lr_scheduler = example_optimizer(unet, tc, fused=device.type in ("cuda", "cpu"))
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    model = torch.compile(unet) if compile_unet else unet
    num_t, n, batch = noise_scheduler.config.num_train_timesteps, len(latents), tc.batch_size
    alphas = noise_scheduler.alphas_cumprod.to(device)

    def step(i: int) -> torch.Tensor:
        idx = torch.randint(0, n, (batch,), device=device)
        z0, context = latents[idx].float(), contexts[idx]
        noise = torch.randn_like(z0)
        t = torch.randint(0, num_t, (batch,), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with accelerator.autocast():
            pred = model(noisy, t, context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        update(accelerator, loss, unet, optimizer, lr_scheduler, tc.max_grad_norm)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    every, rates, losses = tc.log_every, [], []
    t_start = t_window = time.time()
    warmup_s = None
    for done in range(1, tc.max_steps + 1):
        losses.append(step(done))
        if done % every == 0 or done == warmup:
            sync()
            now = time.time()
            if done == warmup:
                warmup_s = now - t_start
            if done % every == 0:
                if done - every >= warmup:
                    rates.append(every * batch / (now - t_window))
                t_window = now
    accelerator.free_memory()
    if not rates:
        raise RuntimeError(f"no timed window after the {warmup} warm-up steps (log_every={every})")
    return {"images_per_s": round(float(np.mean(rates)), 2), "window_images_per_s": [round(v, 2) for v in rates],
            "final_loss": round(float(losses[-1]), 5), "compiled": compile_unet, "cache_s": round(cache_s, 2),
            "warmup_steps_s": round(warmup_s, 2) if warmup_s is not None else None}


# ----------------------------------------------------------------------------------------------
# 5. The comparison
# ----------------------------------------------------------------------------------------------

def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    p.add_argument("--steps", type=int, help="timed steps per side, after the warm-up")
    p.add_argument("--warmup", type=int, help="untimed steps first, per side")
    p.add_argument("--batch-size", type=int, help="global batch")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    p.add_argument("--num-workers", type=int, help="DataLoader workers (diffusers-style loop and ours' caching)")
    p.add_argument("--resolution", type=int, help="image side in pixels")
    p.add_argument("--num-images", type=int, help="generate this many shapes images into a temporary folder "
                                                  "(default for cpu-tiny: the built-in 6000-image dataset)")
    p.add_argument("--compile", choices=["auto", "regional", "full", "false"], default="auto",
                   help="ours' train.compile (auto: regional on CUDA, off on CPU); the diffusers-style loop stays "
                        "eager, as the example runs by default")
    p.add_argument("--channels-last", choices=["auto", "true", "false"], default="auto",
                   help="ours' train.channels_last (auto: on CUDA only)")
    p.add_argument("--tuned-compile", choices=["auto", "true", "false"], default="auto",
                   help="torch.compile the tuned diffusers loop's U-Net (auto: on CUDA, where its baseline did)")
    p.add_argument("--sides", default="ours,diffusers-style,diffusers-tuned",
                   help="comma list of the sides to run")
    p.add_argument("--out", type=Path, default=Path("results.json"))
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error(f"need --steps >= 1, --warmup >= 0, --batch-size >= 1; got {args.steps}, {args.warmup}, "
                f"{args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    log_every = log_every_for(args.steps, args.warmup)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        if args.num_images is None:
            dataset = "shapes"
        else:
            dataset = str(generate_shapes(tmp / "shapes", num_images=args.num_images, resolution=args.resolution))
        vae = str(make_sd_vae(tmp / "vae")) if preset["sd_vae"] else "builtin"
        cfg = make_config(args, tmp, dataset, vae, log_every)

        sides = {}
        for side in args.sides.split(","):
            if side == "ours":
                sides[side] = run_ours(cfg, args.warmup)
            elif side == "diffusers-style":
                sides[side] = run_diffusers_style(cfg, args.warmup, args.num_workers)
            elif side == "diffusers-tuned":
                compiled = torch.cuda.is_available() if args.tuned_compile == "auto" else args.tuned_compile == "true"
                sides[side] = run_diffusers_tuned(cfg, args.warmup, compiled)
            else:
                raise SystemExit(f"--sides: {side!r} is not one of ours, diffusers-style, diffusers-tuned")
            release_memory()

    rate = {k: v["images_per_s"] for k, v in sides.items()}
    results = {
        "device": device_name(), "torch": torch.__version__, "preset": args.preset,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "log_every": log_every,
        "mixed_precision": args.mixed_precision, "resolution": args.resolution, "compile": args.compile,
        "channels_last": args.channels_last,
        "dataset": "shapes (built-in)" if args.num_images is None else f"shapes, {args.num_images} images generated",
        "num_workers": args.num_workers,
        **{f"{k.replace('-', '_')}_images_per_s": v for k, v in rate.items()},
    }
    if "ours" in rate and "diffusers-style" in rate:
        results["ratio"] = round(rate["ours"] / rate["diffusers-style"], 3)
    if "ours" in rate and "diffusers-tuned" in rate:
        results["ratio_vs_tuned"] = round(rate["ours"] / rate["diffusers-tuned"], 3)
    if "ours" in sides:
        results["ours_setup_and_cache_s"] = sides["ours"]["setup_and_cache_s"]
        results["ours_outside_loop_s"] = sides["ours"]["outside_loop_s"]
    results.update({k.replace("-", "_"): v for k, v in sides.items()})
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return results


def format_table(r: dict) -> str:
    names = {"ours": "ours (cached)", "diffusers_style": "diffusers-style", "diffusers_tuned": "diffusers tuned"}
    lines = [
        f"training throughput, {r['preset']}: {r['device']}, torch {r['torch']}, batch {r['batch_size']}, "
        f"{r['mixed_precision']} precision, {r['warmup']} + {r['steps']} steps, {r['resolution']} px, "
        f"ours compile={r['compile']} channels_last={r['channels_last']}",
        f"{'side':<18}{'images/s':>10}{'warm-up s':>11}",
    ]
    for key, name in names.items():
        if key in r:
            side = r[key]
            warm = side.get("warmup_steps_s")
            lines.append(f"{name:<18}{side['images_per_s']:>10.2f}{warm if warm is not None else float('nan'):>11.1f}"
                         + (" (compiled)" if side.get("compiled") else ""))
    if "ratio" in r:
        lines.append(f"ratio = ours / diffusers-style = {r['ratio']:.2f}")
    if "ratio_vs_tuned" in r:
        lines.append(f"ratio = ours / diffusers tuned = {r['ratio_vs_tuned']:.2f}")
    if r.get("ours_setup_and_cache_s") is not None:
        lines.append(f"ours, one-off: {r['ours_setup_and_cache_s']:.1f} s from start to caches written")
    if "ours_outside_loop_s" in r:
        lines.append(f"ours, one-off: {r['ours_outside_loop_s']:.1f} s outside the training loop in all "
                     f"(caches, start/end validation, export)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
