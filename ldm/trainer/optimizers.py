"""The optimizers ``train.optimizer`` names, each built from the parameter groups and the ``train`` section."""

from __future__ import annotations

import torch


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


OPTIMIZERS = {"adamw": adamw, "adamw8bit": adamw8bit}


def make_optimizer(params: list[dict], tc, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``tc.optimizer`` names over the parameter groups ``params``."""
    return OPTIMIZERS[tc.optimizer](params, tc, device)
