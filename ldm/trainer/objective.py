"""Training objectives: what one step's batch costs, as named loss terms.

An objective turns the inputs a `BatchSource` loads into the network's regression problem and scores the
network on it. Everything random in it is drawn once per step for the whole global batch, from the step's
seed, so a step is the same on any number of processes. A new model family (pixels, super-resolution) is a
new objective with the same two methods, ``draw(plan)`` and ``__call__(model, parts)``.
"""

from __future__ import annotations


import torch

from ldm.diffusion.gaussian import GaussianDiffusion
from ldm.diffusion.timesteps import ImportanceSampler, sample_timesteps
from ldm.data.images import downsample
from ldm.models.vae import encode, latent_scale_shift, scaled_sample
from pipelines import vae_scale_factor



class TextContext:
    """Caption indices -> the U-Net's context (b, L, D): rows of the embedding cache when the text encoder is
    frozen, else the encoder's forward. Where ``drop`` is set the empty caption stands in (classifier-free
    guidance)."""

    def __init__(self, input_ids: torch.Tensor, empty_ids: torch.Tensor, encoder=None, cache: dict | None = None):
        if (encoder is None) == (cache is None):
            raise ValueError("text context comes from either a text encoder or an embedding cache")
        self.input_ids, self.empty_ids, self.encoder, self.cache = input_ids, empty_ids, encoder, cache
        self.empty_embed = torch.from_numpy(cache["empty"][0].copy()) if cache is not None else None

    def __call__(self, captions: torch.Tensor, drop: torch.Tensor, device) -> torch.Tensor:
        if self.cache is not None:
            from ldm.data.cache import take

            context = take(self.cache["embeds"], captions)
            context[drop] = self.empty_embed
            return context.to(device)
        ids = self.input_ids[captions]
        ids[drop] = self.empty_ids
        return self.encoder(ids.to(device))[0]


class LatentDiffusionObjective:
    """Denoising on VAE latents (Rombach et al. 2022) under text context.

    Per image: a fresh posterior sample z ~ q(z|x) from the cached (mean, std) (or its mean, with
    ``latent_posterior="mean"``), shifted and scaled; a timestep (uniform, logit-normal, or importance-sampled
    with its weight); noise, with offset noise when asked; caption dropout. The terms are Gaussian
    diffusion's (``mse``, and ``vb`` for a learned variance, min-SNR weighted when asked); with a second
    part (DreamBooth's class images) its mean loss is the prior-preservation term (Ruiz et al. 2023, eq. 2)
    added at ``prior_loss_weight``.
    """

    def __init__(self, diffusion: GaussianDiffusion, dcfg, caption_dropout: float, text: TextContext, vae,
                 prior_loss_weight: float = 1.0, gather=None, mask_floor: float = 0.0):
        """``gather``: all-gathers a tensor across processes (``accelerator.gather``), so every process keeps
        the same importance-sampling history. ``mask_floor``: the loss weight of pixels a mask leaves out."""
        self.diffusion, self.d, self.caption_dropout, self.text = diffusion, dcfg, caption_dropout, text
        self.importance = ImportanceSampler(diffusion.num_timesteps) if dcfg.timestep_sampling == "importance" \
            else None
        self.gather = gather or (lambda x: x)
        self.vae, self.prior_loss_weight, self.mask_floor = vae, prior_loss_weight, mask_floor
        self.scale, self.shift = latent_scale_shift(vae)
        self.channels = vae.config.latent_channels
        self.factor = vae_scale_factor(vae)

    def draw(self, plan) -> dict:
        """The random draws of one source's global batch, from its step seed: timesteps (B,), diffusion noise
        and posterior noise (B, C, h, w), and the caption-dropout mask (B,)."""
        g = torch.Generator().manual_seed(plan.draws_seed)
        n, (h, w), d = len(plan), plan.size, self.d
        shape = (n, self.channels, h // self.factor, w // self.factor)
        if self.importance is not None:
            t, weights = self.importance.sample(n, g)
        else:
            t = sample_timesteps(n, self.diffusion.num_timesteps, d.timestep_sampling, g, d.timestep_mean, d.timestep_std)
            weights = torch.ones(n)
        noise = torch.randn(shape, generator=g)
        posterior = torch.randn(shape, generator=g)
        drop = torch.rand(n, generator=g) < self.caption_dropout
        if d.offset_noise:  # a per-(image, channel) constant lets the model change the mean brightness
            noise = noise + d.offset_noise * torch.randn((n, self.channels, 1, 1), generator=g)
        return {"t": t, "noise": noise, "posterior": posterior, "drop": drop, "weights": weights}

    def inputs(self, batch: dict, draws: dict, sl: slice, device) -> tuple:
        """(z0, t, noise, context, weights) of the slice ``sl`` of a global batch that ``batch`` was loaded from."""
        if "pixels" in batch:  # images that could not be cached (a new crop every step): encode them now
            mean, std = encode(self.vae, batch["pixels"])
        else:
            mean, std = batch["mean"], batch["std"]
        # z0 ~ q(z | x): a fresh draw from the posterior each step (or its mean), scaled to unit variance.
        eps = draws["posterior"][sl].to(device)
        if self.d.latent_posterior == "mean":
            eps = torch.zeros_like(eps)
        z0 = scaled_sample(mean.to(device), std.to(device), eps, self.scale, self.shift)
        context = self.text(batch["captions"], draws["drop"][sl], device)  # (b, L, D)
        return z0, draws["t"][sl].to(device), draws["noise"][sl].to(device), context, draws["weights"][sl].to(device)

    def loss_weight(self, batch: dict, size: tuple[int, int], device) -> torch.Tensor:
        """Per-latent-pixel loss weights (b, 1, h, w) of a masked loss: floor + (1 - floor) * mask, the mask
        area-averaged to latent size; ones for a batch without masks (DreamBooth's class images)."""
        if "mask" not in batch:
            return torch.ones(len(batch["captions"]), 1, *size, device=device)
        mask = batch["mask"].to(device).float()
        if mask.shape[-2:] != size:  # cut from pixels this step
            mask = downsample(mask, self.factor)
        return self.mask_floor + (1 - self.mask_floor) * mask

    def network(self, unet, context):
        """The denoiser (x_t, t) -> the U-Net's output under ``context`` (and a subclass's extra inputs)."""
        return lambda x, t: unet(x, t, encoder_hidden_states=context).sample

    def __call__(self, unet, parts: list[tuple[dict, dict, slice]], device) -> tuple[dict, torch.Tensor]:
        """Named loss terms (b,) of the first part, ``prior_loss`` of the second, and the loss to minimise.
        Both parts go through one forward, as DDP wants."""
        z0, t, noise, context, weights, *extra = (torch.cat(x) for x in zip(*(self.inputs(b, d, sl, device)
                                                                              for b, d, sl in parts)))
        d = self.d
        weight = None
        if any("mask" in b for b, _, _ in parts):  # a masked loss
            weight = torch.cat([self.loss_weight(b, z0.shape[-2:], device) for b, _, _ in parts])
        all_terms = self.diffusion.training_losses(self.network(unet, context, *extra), z0, t, noise,
                                                   snr_gamma=d.snr_gamma, vlb_weight=d.vlb_weight,
                                                   loss_type=d.loss_type, weight=weight)
        if self.importance is not None:
            self.importance.update(self.gather(t), self.gather(all_terms["loss"].detach()))
            all_terms["loss"] = all_terms["loss"] * weights
        n = len(parts[0][0]["captions"])
        terms = {key: v[:n] for key, v in all_terms.items()}
        loss = terms["loss"].mean()
        if len(parts) > 1:
            terms["prior_loss"] = all_terms["loss"][n:]
            loss = loss + self.prior_loss_weight * terms["prior_loss"].mean()
        return terms, loss
