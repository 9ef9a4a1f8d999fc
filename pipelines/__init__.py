"""Inference pipelines."""

from .ldm_pipeline import LDMPipeline, vae_scale_factor

__all__ = ["LDMPipeline", "vae_scale_factor"]
