"""Training objectives: what one step's batch costs, as named loss terms.

An objective turns the inputs a `BatchSource` loads into the network's regression problem and scores the
network on it. Everything random in it is drawn once per step for the whole global batch, from the step's
seed, so a step is the same on any number of processes. ``draw(plan)`` makes a step's draws, ``inputs(batch,
draws, slice)`` one part's `ObjectiveInputs`, ``network(unet, inputs)`` the denoiser they condition, and
``objective(unet, parts)`` the loss; a stage that conditions the U-Net on more than text (a super-resolution
stage's low-resolution image) adds them to ``ObjectiveInputs.conditions`` and reads them in its ``network``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ldm.data.images import downsample
from ldm.diffusion.gaussian import GaussianDiffusion
from ldm.diffusion.timesteps import make_timestep_sampler
from ldm.models.vae import encode, scaled_sample
from pipelines.latents import latent_scale_shift, vae_scale_factor


@dataclass
class ObjectiveInputs:
    """What the network and the loss take of one part of a step (or of the validation images), b rows."""

    latents: torch.Tensor  # z0 (b, C, h, w): clean latents (or pixels), scaled to unit variance
    timesteps: torch.Tensor  # (b,)
    noise: torch.Tensor  # (b, C, h, w)
    context: torch.Tensor | None  # (b, L, D) text context; None until the caller encodes the captions
    weights: torch.Tensor  # (b,) loss weight of each example (importance-sampled timesteps; ones otherwise)
    pixel_weights: torch.Tensor | None = None  # (b, 1, h, w) loss weight of each latent pixel (a masked loss)
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)  # more network inputs, (b, ...) each
    input_noise: torch.Tensor | None = None  # (b, C, h, w) the noise x_t is made with, when not ``noise``

    def __len__(self) -> int:
        return len(self.latents)

    @classmethod
    def cat(cls, parts: list[ObjectiveInputs]) -> ObjectiveInputs:
        """The parts of one forward, one after the other (DreamBooth: the subject's images, then the class's). When
        one part weighs its pixels, the others weigh every pixel 1."""
        pixel_weights = None
        if any(p.pixel_weights is not None for p in parts):
            pixel_weights = torch.cat([p.pixel_weights if p.pixel_weights is not None else
                                       torch.ones(len(p), 1, *p.latents.shape[-2:], device=p.latents.device)
                                       for p in parts])
        input_noise = None
        if any(p.input_noise is not None for p in parts):
            input_noise = torch.cat([p.input_noise if p.input_noise is not None else p.noise for p in parts])
        return cls(torch.cat([p.latents for p in parts]), torch.cat([p.timesteps for p in parts]),
                   torch.cat([p.noise for p in parts]), torch.cat([p.context for p in parts]),
                   torch.cat([p.weights for p in parts]), pixel_weights,
                   {k: torch.cat([p.conditions[k] for p in parts]) for k in parts[0].conditions}, input_noise)

    def rows(self, sl: slice, device) -> ObjectiveInputs:
        """Rows ``sl`` on ``device``."""
        def take(x):
            return None if x is None else x[sl].to(device)

        return ObjectiveInputs(take(self.latents), take(self.timesteps), take(self.noise), take(self.context),
                               take(self.weights), take(self.pixel_weights),
                               {k: take(v) for k, v in self.conditions.items()}, take(self.input_noise))


class TextContext:
    """Caption indices (or, streamed, token ids (b, L), or precomputed embeddings (b, L, D)) -> the U-Net's context
    (b, L, D): rows of the embedding cache when the text encoder is frozen, else the encoder's forward. Where
    ``drop`` is set the empty caption stands in (classifier-free guidance)."""

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
        if captions.is_floating_point():  # streamed with precomputed embeddings (b, L, D): the encoder is frozen
            context = captions.clone()
            context[drop] = self.empty_context()
            return context.to(device)
        ids = captions.clone() if captions.dim() == 2 else self.input_ids[captions]  # streamed: token ids already
        ids[drop] = self.empty_ids
        return self.encoder(ids.to(device))[0]

    @torch.no_grad()
    def empty_context(self) -> torch.Tensor:
        """The frozen encoder's embedding of the empty caption (L, D), on the CPU, computed once."""
        if self.empty_embed is None:
            device = next(self.encoder.parameters()).device
            self.empty_embed = self.encoder(self.empty_ids[None].to(device))[0][0].float().cpu()
        return self.empty_embed

    def encode(self, captions: torch.Tensor, drop: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        """(context, more U-Net conditions by name): none besides the context here."""
        return self(captions, drop, device), {}

    @staticmethod
    def validation_context(text_encoder, ids: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        """The context of validation captions' ``ids``, by the text encoder being trained, and more conditions."""
        return text_encoder(ids.to(device))[0], {}


class LatentDiffusionObjective:
    """Denoising on VAE latents (Rombach et al. 2022) under text context.

    Per image: a fresh posterior sample z ~ q(z|x) from the cached (mean, std) (or its mean, with
    ``latent_posterior="mean"``), shifted and scaled; a timestep from the run's `TimestepSampler` (uniform,
    logit-normal, or importance-sampled with its weight); noise, with offset noise when asked; caption dropout.
    The terms are Gaussian diffusion's (``mse``, and ``vb`` for a learned variance, min-SNR weighted when asked);
    with a second part (DreamBooth's class images) its mean loss is the prior-preservation term (Ruiz et al.
    2023, eq. 2) added at ``prior_loss_weight``.
    """

    def __init__(self, diffusion: GaussianDiffusion, dcfg, caption_dropout: float, text: TextContext, vae,
                 prior_loss_weight: float = 1.0, gather=None, mask_floor: float = 0.0):
        """``dcfg``: the config's ``diffusion`` section. ``gather``: all-gathers a tensor across processes
        (``accelerator.gather``), so every process keeps the same importance-sampling history. ``mask_floor``: the
        loss weight of pixels a mask leaves out."""
        self.diffusion, self.d, self.caption_dropout, self.text = diffusion, dcfg, caption_dropout, text
        self.timesteps = make_timestep_sampler(dcfg.timestep_sampling, diffusion.num_timesteps, dcfg.timestep_mean,
                                               dcfg.timestep_std, gather, dcfg.min_timestep, dcfg.max_timestep)
        self.vae, self.prior_loss_weight, self.mask_floor = vae, prior_loss_weight, mask_floor
        self.scale, self.shift = latent_scale_shift(vae)
        self.channels = vae.config.latent_channels
        self.factor = vae_scale_factor(vae)

    def draw(self, plan) -> dict:
        """The random draws of one source's global batch, from its step seed: timesteps and their loss weights
        (B,), diffusion noise and posterior noise (B, C, h, w), and the caption-dropout mask (B,)."""
        g = torch.Generator().manual_seed(plan.draws_seed)
        n, (h, w), d = len(plan), plan.size, self.d
        shape = (n, self.channels, h // self.factor, w // self.factor)
        t, weights = self.timesteps.sample(n, g)
        noise = torch.randn(shape, generator=g)
        posterior = torch.randn(shape, generator=g)
        drop = torch.rand(n, generator=g) < self.caption_dropout
        if d.offset_noise:  # a per-(image, channel) constant lets the model change the mean brightness
            noise = noise + d.offset_noise * torch.randn((n, self.channels, 1, 1), generator=g)
        out = {"t": t, "noise": noise, "posterior": posterior, "drop": drop, "weights": weights}
        if d.input_perturbation:  # the noise x_t is made with; the target keeps `noise`
            out["input_noise"] = noise + d.input_perturbation * torch.randn(shape, generator=g)
        return out

    def inputs(self, batch: dict, draws: dict, sl: slice, device) -> ObjectiveInputs:
        """The inputs of the slice ``sl`` of a global batch that ``batch`` was loaded from."""
        if "pixels" in batch:  # images that could not be cached (a new crop every step): encode them now
            mean, std = self.encode_pixels(batch["pixels"])
        else:
            mean, std = batch["mean"], batch["std"]
        # z0 ~ q(z | x): a fresh draw from the posterior each step (or its mean), scaled to unit variance.
        eps = draws["posterior"][sl].to(device)
        if self.d.latent_posterior == "mean":
            eps = torch.zeros_like(eps)
        z0 = scaled_sample(mean.to(device), std.to(device), eps, self.scale, self.shift)
        context, conditions = self.text.encode(batch["captions"], draws["drop"][sl], device)  # (b, L, D), by name
        inputs = ObjectiveInputs(z0, draws["t"][sl].to(device), draws["noise"][sl].to(device), context,
                                 draws["weights"][sl].to(device), self.pixel_weights(batch, z0.shape[-2:], device),
                                 conditions)
        if "input_noise" in draws:
            inputs.input_noise = draws["input_noise"][sl].to(device)
        return inputs

    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior (mean, std) (b, C, h, w) of pixels cut this step, encoded under the step's autocast."""
        return encode(self.vae, pixels)

    def pixel_weights(self, batch: dict, size: tuple[int, int], device) -> torch.Tensor | None:
        """Per-latent-pixel loss weights (b, 1, h, w) of a masked loss: floor + (1 - floor) * mask, the mask
        area-averaged to latent size; None for a batch without masks."""
        if "mask" not in batch:
            return None
        mask = batch["mask"].to(device).float()
        if mask.shape[-2:] != size:  # cut from pixels this step
            mask = downsample(mask, self.factor)
        return self.mask_floor + (1 - self.mask_floor) * mask

    def validation_inputs(self, mean: torch.Tensor, std: torch.Tensor, seed: int, arrays: dict) -> ObjectiveInputs:
        """Fixed inputs for the validation loss of V images, the same at every validation: posterior samples of
        ``mean``/``std`` (V, C, h, w), timesteps spread evenly over [0, T) and noise, all drawn from ``seed``;
        ``arrays``: the images' other per-image arrays by name (a stage's conditions). The context is left to the
        caller, which encodes the captions with the text encoder being trained."""
        g = torch.Generator().manual_seed(seed)
        z0 = scaled_sample(mean, std, torch.randn(mean.shape, generator=g), self.scale, self.shift)  # (V, C, h, w)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.linspace(0, self.diffusion.num_timesteps - 1, len(z0)).round().long()
        return ObjectiveInputs(z0, t, noise, None, torch.ones(len(z0)))

    def network(self, unet, inputs: ObjectiveInputs):
        """The denoiser (x_t, t) -> the U-Net's output under the inputs' context (and a stage's conditions)."""
        return lambda x, t: unet(x, t, encoder_hidden_states=inputs.context).sample

    def __call__(self, unet, parts: list[tuple[dict, dict, slice]], device) -> tuple[dict, torch.Tensor]:
        """Named loss terms (b,) of the first part, ``prior_loss`` of the second, and the loss to minimise.
        Both parts go through one forward, as DDP wants."""
        inputs = ObjectiveInputs.cat([self.inputs(batch, draws, sl, device) for batch, draws, sl in parts])
        d = self.d
        all_terms = self.diffusion.training_losses(self.network(unet, inputs), inputs.latents, inputs.timesteps,
                                                   inputs.noise, snr_gamma=d.snr_gamma, vlb_weight=d.vlb_weight,
                                                   loss_type=d.loss_type, weight=inputs.pixel_weights,
                                                   input_noise=inputs.input_noise, debiased=d.debiased_estimation,
                                                   distance=d.distance, huber_c=d.huber_c)
        self.timesteps.update(inputs.timesteps, all_terms["loss"].detach())
        all_terms["loss"] = all_terms["loss"] * inputs.weights
        n = len(parts[0][0]["captions"])
        terms = {key: v[:n] for key, v in all_terms.items()}
        loss = terms["loss"].mean()
        if len(parts) > 1:
            terms["prior_loss"] = all_terms["loss"][n:]
            loss = loss + self.prior_loss_weight * terms["prior_loss"].mean()
        return terms, loss
