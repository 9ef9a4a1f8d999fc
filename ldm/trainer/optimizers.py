"""The optimizers ``train.optimizer`` names, each built from the parameter groups and the ``train`` section."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def adamw(params: list[dict], tc, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW, fused on CUDA and on CPU (one kernel over all tensors: a training step of the shapes preset
    takes 0.51 s instead of 0.60 s on 2 cores); it matches the unfused update to float32 rounding."""
    return torch.optim.AdamW(params, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay,
                             fused=device.type in ("cuda", "cpu") or None)


def adamw8bit(params: list[dict], tc, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW: the optimizer state in 8 bits (needs bitsandbytes)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                          "use train.optimizer=adamw without it") from e
    return bnb.optim.AdamW8bit(params, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay)


def adafactor(params: list[dict], tc, device: torch.device) -> torch.optim.Optimizer:
    """transformers' Adafactor (Shazeer & Stern 2018): factored second moments, no first moment, so its state is
    a row and a column per matrix instead of AdamW's two full copies (a full SDXL fine-tune on 24 GB). As the
    community runs it for diffusion: the run's learning rate and schedule, not its own relative step or parameter
    scaling."""
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=tc.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=tc.weight_decay)


def prodigy(params: list[dict], tc, device: torch.device) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023, the `prodigyopt` package): Adam whose step size it estimates itself;
    ``train.learning_rate`` scales that estimate (1.0 as its authors advise, with a constant schedule)."""
    from prodigyopt import Prodigy

    if tc.learning_rate < 0.1:
        logger.warning("train.optimizer=prodigy estimates the step size itself and train.learning_rate=%g scales "
                       "it: the usual setting is 1.0 (smaller values train that many times slower)", tc.learning_rate)
    return Prodigy(params, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay,
                   use_bias_correction=True, safeguard_warmup=tc.warmup_steps > 0)


OPTIMIZERS = {"adamw": adamw, "adamw8bit": adamw8bit, "adafactor": adafactor, "prodigy": prodigy}


def make_optimizer(params: list[dict], tc, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``tc.optimizer`` names over the parameter groups ``params``."""
    return OPTIMIZERS[tc.optimizer](params, tc, device)
