"""Gaussian diffusion on latents: schedules, forward process, posterior, reverse process and losses.

A plain object of schedule constants (float64); the network is passed into each method. It is built
from a diffusers scheduler config and agrees with diffusers' ``DDPMScheduler`` on the same config.

Notation (Ho et al. 2020, "DDPM"; Nichol & Dhariwal 2021, "Improved DDPM"):
    q(x_t | x_{t-1}) = N(sqrt(1 - β_t) x_{t-1}, β_t I),  ᾱ_t = Π_{s<=t} (1 - β_s)
    q(x_t | x_0)     = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)                        (DDPM eq. 4)
    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)                                    (DDPM eq. 6-7)
    p_θ(x_{t-1} | x_t)    = N(μ_θ(x_t, t), Σ_θ(x_t, t))
Timesteps are 0-based as in diffusers: t = 0 is the first noising step, t = T - 1 the last.
"""

from __future__ import annotations

import logging
import math
from enum import Enum
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# β schedules (float64)
# ----------------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """ᾱ(t) for t in [0, 1] of Improved DDPM eq. 17 (without the normalisation by ᾱ(0))."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               max_beta: float = 0.999) -> torch.Tensor:
    """β_1..β_T in float64 for one of ``BETA_SCHEDULES`` (names as in diffusers)."""
    T = num_timesteps
    if schedule == "linear":  # DDPM
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(β)
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":  # Improved DDPM eq. 17, β clipped at max_beta
        i = torch.arange(T, dtype=torch.float64)
        return (1 - cosine_alpha_bar((i + 1) / T) / cosine_alpha_bar(i / T)).clamp(max=max_beta)
    if schedule == "sigmoid":  # GeoDiff: sigmoid over [-6, 6] mapped onto [beta_start, beta_end]
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"unknown beta_schedule {schedule!r}; valid: {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ᾱ_t) so that ᾱ_T = 0 while ᾱ_1 is kept (Lin et al. 2024, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


# ----------------------------------------------------------------------------------------------
# Gaussian helpers
# ----------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x, mean, logvar) -> torch.Tensor:
    """-log N(x; mean, e^logvar) elementwise, in nats: the continuous t=0 decoder term for latents."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def discretized_gaussian_nll(x, mean, logvar, bins: int = 256) -> torch.Tensor:
    """-log P(x) elementwise, in nats, for pixels x in [-1, 1] quantised to ``bins`` levels under
    N(mean, e^logvar): the Gaussian's mass over x's bin, the edge bins open-ended (Ho et al. 2020, §3.3), so
    the bound is a bound on the likelihood of the 8-bit image and comparable with published bits/dim.
    A bin's mass is floored at 1e-12 (as improved-diffusion does), so every branch stays finite and so do
    the gradients through ``torch.where``."""
    half = 1.0 / (bins - 1)  # half a bin in [-1, 1] units
    inv_std = torch.exp(-0.5 * logvar)
    upper, lower = (x - mean + half) * inv_std, (x - mean - half) * inv_std
    ndtr = torch.special.ndtr
    # Mass of the bin from whichever tail it is nearer, so that two CDFs near 1 do not cancel.
    delta = torch.where(x > mean, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    mass = torch.where(x < -1 + half, ndtr(upper), torch.where(x > 1 - half, ndtr(-lower), delta))
    log_p = torch.log(mass.clamp(min=1e-12))
    return -log_p


def pointwise_distance(diff: torch.Tensor, distance: str = "l2", c: float = 0.1) -> torch.Tensor:
    """The per-element loss of a prediction's error ``diff``: squared ("l2"), pseudo-Huber ("huber":
    2c(√(d² + c²) − c), about d² near 0 and 2c|d| far out) or "smooth_l1" (2(√(d² + c²) − c))."""
    if distance == "l2":
        return diff ** 2
    if distance not in DISTANCES:
        raise ValueError(f"distance {distance!r} is not one of {DISTANCES}")
    root = torch.sqrt(diff ** 2 + c * c) - c
    return 2 * c * root if distance == "huber" else 2 * root


def mean_flat(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,). With ``weight`` (broadcastable to x, e.g.
    (B, 1, h, w)), the weighted mean Σ w·x / Σ w per sample, so its scale does not depend on how much of the
    sample the weight covers."""
    if weight is None:
        return x.flatten(1).mean(1)
    w = weight.to(x.dtype).expand_as(x).flatten(1)
    return (x.flatten(1) * w).sum(1) / w.sum(1).clamp_min(torch.finfo(x.dtype).tiny)


LOSS_TYPES = ("simple", "vlb")
DISTANCES = ("l2", "huber", "smooth_l1")  # L_simple's distance between the prediction and its target
# Input values per network pass when the likelihood bound batches timesteps (GaussianDiffusion.nll_bpd). On
# the 2-core CPU, a study model's full bound on 4 shapes images took 50 s at one t per pass and 17 / 12.6 /
# 12.2 / 17 s at 2^16 / 2^17 / 2^18 / 2^19 values (its strided bound on 32 images 7.6 / 6.4 / 8.4 / 8.1 s).
NLL_PASS_VALUES = 1 << 17


class PredictionType(str, Enum):
    """What the network's mean output is (names as diffusers' ``prediction_type``)."""

    EPSILON = "epsilon"
    V = "v_prediction"
    X0 = "sample"


class VarianceType(str, Enum):
    """How Σ_θ is chosen: fixed β̃_t, fixed β_t, or learned between them (Improved DDPM eq. 15)."""

    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED_RANGE = "learned_range"


class GaussianDiffusion:
    """Schedule constants and the math of forward/reverse processes; holds no network."""

    def __init__(self, betas: torch.Tensor, prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                 clip_x0: bool = False, discrete_decoder: bool = False):
        """``clip_x0``: clamp x̂_0 to [-1, 1] in the reverse process (pixels; the scheduler's ``clip_sample``).
        ``discrete_decoder``: the t = 0 term of the bound is the discretized Gaussian of 8-bit pixels, not a
        continuous density (latents)."""
        self.clip_x0, self.discrete_decoder = clip_x0, discrete_decoder
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        try:
            self.prediction_type = PredictionType(prediction_type)
        except ValueError:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; "
                             f"valid: {[p.value for p in PredictionType]}") from None
        try:
            self.variance_type = VarianceType(variance_type)
        except ValueError:
            raise ValueError(f"unknown variance_type {variance_type!r}; "
                             f"valid: {[v.value for v in VarianceType]}") from None
        self.num_timesteps = T = len(betas)
        self.betas = betas
        self.alphas_cumprod = ac = torch.cumprod(1 - betas, 0)
        if ac[-1] == 0 and self.prediction_type == PredictionType.EPSILON:
            raise ValueError("a zero-terminal-SNR schedule needs prediction_type 'v_prediction' or 'sample': "
                             "at t=T-1 x_t holds no x_0, so x_0 cannot be recovered from ε")
        if self.prediction_type == PredictionType.EPSILON and betas[-1] > 0.5:
            # x̂_0 = (x_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t): the first sampling step multiplies the error of ε̂
            # by about 1/sqrt(1-β_T). Pixel models clip x̂_0 to [-1, 1]; latents cannot be clipped.
            logger.warning("β_T=%.3f with ε-prediction: the first sampling step amplifies the network's "
                           "error %.0fx and unclipped latent samples can diverge; prefer scaled_linear or "
                           "v_prediction", float(betas[-1]), float(1 / (1 - betas[-1]).sqrt()))
        self.alphas_cumprod_prev = acp = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - ac).sqrt()
        # β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t  (DDPM eq. 7). β̃_0 = 0, so its log is clipped to β̃_1,
        # which only matters at t = 0 where no noise is added in sampling.
        self.posterior_variance = (1 - acp) / (1 - ac) * betas
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if T > 1 else betas)
        self.posterior_mean_coef1 = betas * acp.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - acp) * (1 - betas).sqrt() / (1 - ac)
        self.snr = ac / (1 - ac)  # signal-to-noise ratio ᾱ_t / (1 - ᾱ_t)
        self.log_betas = torch.log(betas)
        # Improved DDPM's "fixed large" variance uses β̃_1 in place of β_1 at t = 0.
        self.fixed_large_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]])
                                                  if T > 1 else betas)

    @classmethod
    def from_scheduler_config(cls, config, **overrides) -> "GaussianDiffusion":
        """Build from a diffusers scheduler config (dict or FrozenDict); keys as ``DDPMScheduler``'s."""
        c = {**dict(config), **overrides}
        if c.get("trained_betas") is not None:
            betas = torch.as_tensor(c["trained_betas"], dtype=torch.float64)
        else:
            betas = make_betas(c.get("beta_schedule", "linear"), c.get("num_train_timesteps", 1000),
                               c.get("beta_start", 1e-4), c.get("beta_end", 0.02))
        if c.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        variance_type = c.get("variance_type") or "fixed_small"
        if variance_type == "learned":
            raise ValueError("variance_type 'learned' (direct log-variance) is not supported; use 'learned_range'")
        return cls(betas, c.get("prediction_type", "epsilon"), variance_type, clip_x0=bool(c.get("clip_sample", False)),
                   discrete_decoder=bool(c.get("discrete_decoder", False)))

    @property
    def learned_variance(self) -> bool:
        return self.variance_type == VarianceType.LEARNED_RANGE

    def _extract(self, arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] shaped (B, 1, 1, ...) to broadcast against ``like``, in ``like``'s dtype and device.

        Tables (attributes set in __init__) are copied to a device once, as float32 off the CPU since
        not every accelerator has float64."""
        if like.device.type != "cpu":
            key = (id(arr), like.device)
            cache = self.__dict__.setdefault("_device_tables", {})
            if key not in cache:
                cache[key] = arr.to(like.device, torch.float32)
            arr = cache[key]
        out = arr[t.to(arr.device).long()]
        return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    # ---- forward process -------------------------------------------------------------------

    def q_mean_variance(self, x0, t):
        """Mean, variance and log-variance of q(x_t | x_0) (DDPM eq. 4)."""
        var = self._extract(1 - self.alphas_cumprod, t, x0)
        return self._extract(self.sqrt_alphas_cumprod, t, x0) * x0, var, torch.log(var)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε  (reparameterised DDPM eq. 4)."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, xt, t):
        """μ̃_t(x_t, x_0), β̃_t and log β̃_t (clipped) of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        mean = self._extract(self.posterior_mean_coef1, t, xt) * x0 + self._extract(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._extract(self.posterior_variance, t, xt), self._extract(self.posterior_log_variance_clipped, t, xt)

    # ---- conversions between ε, v and x_0 -----------------------------------------------------

    def predict_x0_from_eps(self, xt, t, eps):
        return (xt - self._extract(self.sqrt_one_minus_alphas_cumprod, t, xt) * eps) / self._extract(self.sqrt_alphas_cumprod, t, xt)

    def predict_eps_from_x0(self, xt, t, x0):
        return (xt - self._extract(self.sqrt_alphas_cumprod, t, xt) * x0) / self._extract(self.sqrt_one_minus_alphas_cumprod, t, xt)

    def get_velocity(self, x0, noise, t):
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)."""
        return self._extract(self.sqrt_alphas_cumprod, t, x0) * noise - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def predict_x0_from_v(self, xt, t, v):
        return self._extract(self.sqrt_alphas_cumprod, t, xt) * xt - self._extract(self.sqrt_one_minus_alphas_cumprod, t, xt) * v

    def predict_eps_from_v(self, xt, t, v):
        return self._extract(self.sqrt_one_minus_alphas_cumprod, t, xt) * xt + self._extract(self.sqrt_alphas_cumprod, t, xt) * v

    def training_target(self, x0, noise, t):
        """What the network's mean output regresses onto for this prediction type."""
        if self.prediction_type == PredictionType.EPSILON:
            return noise
        if self.prediction_type == PredictionType.V:
            return self.get_velocity(x0, noise, t)
        return x0

    def predict_x0(self, xt, t, mean_output):
        """x̂_0 from the network's mean output, whatever it predicts."""
        if self.prediction_type == PredictionType.EPSILON:
            return self.predict_x0_from_eps(xt, t, mean_output)
        if self.prediction_type == PredictionType.V:
            return self.predict_x0_from_v(xt, t, mean_output)
        return mean_output

    # ---- reverse process ---------------------------------------------------------------------

    def split_output(self, model_output, xt):
        """(B, 2C, ...) -> mean output (B, C, ...) and variance values in [-1, 1] (B, C, ...) or None."""
        c = xt.shape[1]
        if self.learned_variance:
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learned variance needs {2 * c} output channels, got {model_output.shape[1]}")
            return model_output[:, :c], model_output[:, c:]
        if model_output.shape[1] != c:
            raise ValueError(f"expected {c} output channels, got {model_output.shape[1]}")
        return model_output, None

    def model_log_variance(self, t, like, var_values=None):
        """log Σ_θ: fixed β̃_t / β_t, or exp(v log β_t + (1 - v) log β̃_t) with v = (values + 1) / 2
        (Improved DDPM eq. 15)."""
        min_log = self._extract(self.posterior_log_variance_clipped, t, like)
        if self.variance_type == VarianceType.FIXED_SMALL:
            return min_log.expand_as(like)
        if self.variance_type == VarianceType.FIXED_LARGE:
            return self._extract(self.fixed_large_log_variance, t, like).expand_as(like)
        max_log = self._extract(self.log_betas, t, like)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, model_output, xt, t):
        """Mean, log-variance and x̂_0 of p_θ(x_{t-1} | x_t) from the network's raw output.

        μ_θ is the posterior mean at x̂_0 (DDPM eq. 7 with x_0 := x̂_0), which for ε-prediction equals
        DDPM eq. 11.
        """
        mean_out, var_values = self.split_output(model_output, xt)
        x0_hat = self.predict_x0(xt, t, mean_out)
        if self.clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(x0_hat, xt, t)
        return {"mean": mean, "log_variance": self.model_log_variance(t, xt, var_values), "pred_x0": x0_hat}

    def p_sample(self, model_output, xt, t, noise):
        """One ancestral step x_t -> x_{t-1}; no noise is added at t = 0 (DDPM Algorithm 2, line 4)."""
        out = self.p_mean_variance(model_output, xt, t)
        nonzero = (t != 0).to(xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    # ---- losses ------------------------------------------------------------------------------

    def vb_terms_bpd(self, model_output, x0, xt, t, weight=None):
        """L_{t} of the variational bound, per sample, in bits per dimension (``weight``: per-element weights
        of the mean over dimensions, see `mean_flat`).

        t > 0: KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t))            (DDPM eq. 5, L_{t-1})
        t = 0: -log p_θ(x_0 | x_1): a continuous Gaussian density for latents, the discretized Gaussian of
        8-bit pixels with ``discrete_decoder``.
        """
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model_output, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"]), weight) / math.log(2.0)
        decoder = discretized_gaussian_nll if self.discrete_decoder else gaussian_nll
        nll = mean_flat(decoder(x0, out["mean"], out["log_variance"]), weight) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def snr_weights(self, t, snr_gamma: float) -> torch.Tensor:
        """Min-SNR-γ weights (Hang et al. 2023) expressed for this prediction type's MSE, float32 on t's device.

        The table is computed once per γ in float64 on the CPU and kept on each device as float32 (not every
        accelerator has float64)."""
        tables = self.__dict__.setdefault("_snr_weight_tables", {})
        key = (snr_gamma, t.device)
        if key not in tables:
            tables[key] = self._snr_weight_table(snr_gamma).to(t.device)
        return tables[key][t]

    def debiased_weights(self, t) -> torch.Tensor:
        """Debiased-estimation weights (Yu et al. 2024): 1/√SNR(t) on the ε error (SNR capped at 1000, as
        kohya-ss caps it), expressed for this prediction type's error (× SNR/(SNR + 1) for v, × SNR for x_0), 1
        where SNR is 0; float32 on t's device."""
        tables = self.__dict__.setdefault("_debiased_tables", {})
        if t.device not in tables:
            snr = self.snr
            w = 1 / snr.clamp(min=1e-12, max=1000).sqrt()
            if self.prediction_type == PredictionType.V:
                w = w * snr / (snr + 1)
            elif self.prediction_type == PredictionType.X0:
                w = w * snr
            tables[t.device] = torch.where(snr == 0, torch.ones_like(w), w).float().to(t.device)
        return tables[t.device][t]

    def _snr_weight_table(self, snr_gamma: float) -> torch.Tensor:
        snr = self.snr
        clipped = snr.clamp(max=snr_gamma)
        if self.prediction_type == PredictionType.EPSILON:
            w = clipped / snr.clamp(min=1e-12)
        elif self.prediction_type == PredictionType.V:
            w = clipped / (snr + 1)
        else:
            w = clipped
        # At zero terminal SNR the formula gives weight 0, which would leave t = T-1 (where trailing
        # sampling starts) untrained; weight it 1 instead.
        return torch.where(snr == 0, torch.ones_like(w), w).float()

    def training_losses(self, model: Callable, x0, t, noise=None, model_kwargs: dict | None = None,
                        snr_gamma: float | None = None, vlb_weight: float = 0.001, loss_type: str = "simple",
                        weight: torch.Tensor | None = None, input_noise=None, debiased: bool = False,
                        distance: str = "l2", huber_c: float = 0.1) -> dict:
        """Loss terms for one batch: ``mse`` (L_simple), ``vb`` (when the variance is learned) and ``loss``.

        ``loss_type="simple"``: L_simple, and with learned variance the hybrid loss L_simple + λ L_vlb
        (Improved DDPM §3.1), where L_vlb = T · L_t is the single-timestep estimate of the full bound and the
        mean is detached inside it so that L_vlb only trains Σ_θ. ``loss_type="vlb"``: the bound alone trains
        mean and variance (Sohl-Dickstein et al. 2015; Improved DDPM's L_vlb). ``weight`` (B, 1, h, w) weighs
        every term per pixel (a masked loss), normalised per sample by its sum.

        ``input_noise``: the noise that makes x_t when it is not the target's (input perturbation, Ning et al.
        2023: noise + γ ξ in, noise out). ``debiased``: L_simple weighted by 1/√SNR(t) in ε units (Yu et al. 2024),
        expressed for this prediction type as the min-SNR weights are. ``distance``: L_simple's "l2" (the squared
        error), or the pseudo-Huber "huber" 2c(√(d² + c²) − c) or "smooth_l1" 2(√(d² + c²) − c) with c =
        ``huber_c``, less swayed by outliers (the term keeps its name ``mse``).
        """
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
        if loss_type == "vlb" and not self.learned_variance:
            raise ValueError("loss_type 'vlb' trains the variance too: it needs a learned variance "
                             "(diffusion.learned_variance=true)")
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise if input_noise is None else input_noise)
        model_output = model(xt, t, **(model_kwargs or {}))
        mean_out, var_values = self.split_output(model_output, xt)
        mse = mean_flat(pointwise_distance(mean_out.float() - self.training_target(x0, noise, t).float(), distance,
                                           huber_c), weight)
        if snr_gamma is not None:
            mse = mse * self.snr_weights(t, snr_gamma)
        if debiased:
            mse = mse * self.debiased_weights(t)
        terms = {"mse": mse}
        if loss_type == "vlb":
            terms["vb"] = self.vb_terms_bpd(model_output.float(), x0.float(), xt.float(), t,
                                            weight) * self.num_timesteps
            terms["loss"] = terms["vb"]
        elif self.learned_variance:
            frozen = torch.cat([mean_out.detach(), var_values], dim=1).float()
            terms["vb"] = self.vb_terms_bpd(frozen, x0.float(), xt.float(), t, weight) * self.num_timesteps
            terms["loss"] = mse + vlb_weight * terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    # ---- likelihood --------------------------------------------------------------------------

    def prior_bpd(self, x0) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) per sample, bits per dimension."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, logvar = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar))) / math.log(2.0)

    @torch.no_grad()
    def nll_bpd(self, model: Callable, x0, model_kwargs: dict | None = None, generator=None, stride: int = 1,
                timesteps_per_pass: int | None = None) -> dict:
        """Negative log-likelihood bound of x0 in bits per dimension: Σ_t L_t + L_T.

        ``stride`` 1 evaluates every timestep (the full bound). ``stride`` k > 1 computes the terms t < k
        exactly (they hold most of the bound and fall steeply: on the shapes models L_1 is ten times L_25) and
        estimates the rest from one t drawn per block of k, uniformly within it (stratified: unbiased, about
        k + T/k terms per sample). ``timesteps_per_pass`` terms go through the network as one batch
        (``model_kwargs`` tensors are repeated to match); by default as many as keep a pass near
        ``NLL_PASS_VALUES`` input values. The noise is drawn in the same order whatever the batching, so the
        batching changes nothing but speed.
        Returns per-sample ``total_bpd``, ``prior_bpd``, ``decoder_bpd`` (L_0) and the (B, n) terms ``vb``.
        """
        T, n = self.num_timesteps, x0.shape[0]
        if not (isinstance(stride, int) and 1 <= stride <= T):
            raise ValueError(f"stride must be an int in [1, {T}], got {stride!r}")
        if timesteps_per_pass is None:
            timesteps_per_pass = max(1, NLL_PASS_VALUES // x0.numel())
        if not (isinstance(timesteps_per_pass, int) and timesteps_per_pass >= 1):
            raise ValueError(f"timesteps_per_pass must be a positive int, got {timesteps_per_pass!r}")

        head = T if stride == 1 else stride  # t < head exactly
        # Terms in the order they are summed: t < head one by one, then one t drawn per block of `stride`.
        blocks = [(step, 1) for step in range(head)]
        blocks += [(start, min(stride, T - start)) for start in range(head, T, stride)]
        vb, pending = [], []  # pending: the (t, noise) of the next pass, drawn in term order (at most one pass held)

        def run_pending():
            k = len(pending)
            t = torch.cat([p[0] for p in pending]).to(x0.device)
            x0s = x0.repeat(k, *([1] * (x0.dim() - 1)))
            xt = self.q_sample(x0s, t, torch.cat([p[1] for p in pending]).to(x0.device))
            kwargs = {key: v.repeat(k, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v
                      for key, v in (model_kwargs or {}).items()}
            vb.extend(self.vb_terms_bpd(model(xt, t, **kwargs), x0s, xt, t).view(k, n).unbind(0))
            pending.clear()

        for start, width in blocks:
            t = (torch.full((n,), start, dtype=torch.long) if start < head
                 else start + torch.randint(0, width, (n,), generator=generator))
            pending.append((t, torch.randn(x0.shape, generator=generator, dtype=x0.dtype)))
            if len(pending) == timesteps_per_pass:
                run_pending()
        if pending:
            run_pending()
        decoder = vb[0]
        rest = sum((width * v for (_, width), v in zip(blocks[1:], vb[1:])), torch.zeros_like(decoder))
        vb = torch.stack(vb, dim=1)
        prior = self.prior_bpd(x0)
        return {"total_bpd": decoder + rest + prior, "prior_bpd": prior, "decoder_bpd": decoder, "vb": vb}
