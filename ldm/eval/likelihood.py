"""The variational bound on the negative log-likelihood of held-out real images under their captions, in bits
per dimension (`python -m ldm.evaluate --nll`): Σ_t L_t + L_T over the full chain, or with ``stride`` k the terms
t < k exactly and an unbiased stratified estimate of the rest from one timestep in every k
(`GaussianDiffusion.nll_bpd`). A pixel model's t = 0 term is the discretized Gaussian of 8-bit images, so its
number compares with published bits/dim; a latent model's is per dimension of its scaled latents (the
posterior mean of each image)."""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.diffusion.gaussian import GaussianDiffusion
from ldm.eval.metrics import to_tensor
from ldm.eval.scorers import eval_prompts, real_images
from ldm.eval.scoring import open_pipeline
from pipelines.files import atomic_save
from pipelines.latents import latent_scale_shift, scale_latents
from pipelines.ldm_pipeline import Sampling

logger = logging.getLogger(__name__)
NLL_SEED = 9  # the held-out real images whose likelihood is bounded


def _denoiser(unet, xt, t, c, **added):
    """The U-Net's output at (x_t, t) under context ``c`` and a family's added conditions (SDXL's pooled text and
    time_ids)."""
    return unet(xt.to(c.dtype), t, encoder_hidden_states=c, added_cond_kwargs=added or None).sample.float()


@torch.no_grad()
def nll(pipeline, dataset: str, num_images: int = 32, stride: int = 1, batch_size: int = 32, seed: int = 0,
        out: str | None = None) -> dict:
    """The bound on -log p(x | caption) in bits per dimension of ``num_images`` held-out real images of the
    dataset's evaluation prompts (module docstring). ``pipeline``: a folder or an `LDMPipeline`."""
    pipe = open_pipeline(pipeline, dataset, num_images)
    device = pipe.unet.device
    pixels = pipe.vae is None
    diffusion = GaussianDiffusion.from_scheduler_config(pipe.scheduler.config, discrete_decoder=pixels)
    T = diffusion.num_timesteps
    if not (isinstance(stride, int) and 1 <= stride <= T):
        raise ValueError(f"--nll-stride must be an int in [1, {T}] (the model's timesteps), got {stride!r}")
    base = eval_prompts(dataset)
    prompts = [base[i % len(base)] for i in range(num_images)]
    x = to_tensor(real_images(dataset, prompts, NLL_SEED, "heldout")) * 2 - 1  # 8-bit levels in [-1, 1]
    g = torch.Generator().manual_seed(seed)
    t0, parts = time.time(), []
    for i in tqdm(range(0, num_images, batch_size), desc=f"likelihood bound (stride {stride})"):
        xb = x[i:i + batch_size].to(device)
        if not pixels:
            vae = pipe.vae
            z = vae.encode(xb.to(vae.dtype)).latent_dist.mean.float()
            xb = scale_latents(z, *latent_scale_shift(vae))
        batch = prompts[i:i + batch_size]
        # The model family's conditioning of these captions, unguided (SDXL: the pooled text and the drawn size)
        cond = pipe._context(Sampling(batch, [""] * len(batch), *x.shape[-2:], guidance_scale=1.0), device)
        added = cond.unet_kwargs.get("added_cond_kwargs") or {}  # tensors, repeated with x as nll_bpd batches t
        parts.append(diffusion.nll_bpd(functools.partial(_denoiser, pipe.unet), xb.float(), {"c": cond.context, **added},
                                       generator=g, stride=stride))
    total = torch.cat([p["total_bpd"] for p in parts]).double()
    result = {"nll_bpd": float(total.mean()), "nll_bpd_standard_error": float(total.std() / len(total) ** 0.5)
              if len(total) > 1 else None,
              "prior_bpd": float(torch.cat([p["prior_bpd"] for p in parts]).mean()),
              "decoder_bpd": float(torch.cat([p["decoder_bpd"] for p in parts]).mean()),
              "stride": stride, "num_timesteps": T, "network_passes_per_image": T if stride == 1 else stride + len(range(stride, T, stride)),
              "num_images": num_images, "space": "pixels (8-bit, discretized decoder)" if pixels else "latents",
              "variance": pipe.scheduler.config.get("variance_type"), "dataset": dataset,
              "pipeline": str(pipeline) if isinstance(pipeline, (str, Path)) else None,
              "time_s": round(time.time() - t0, 1)}
    if out:
        atomic_save(lambda p: Path(p).write_text(json.dumps(result, indent=2)), Path(out) / "nll.json")
    return result
