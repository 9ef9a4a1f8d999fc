"""Inference pipelines."""

from .ldm_pipeline import LDMPipeline, vae_scale_factor
from .sr_pipeline import SuperResolutionPipeline, low_res_scheduler, rescale_latent_space

__all__ = ["LDMPipeline", "SuperResolutionPipeline", "low_res_scheduler", "rescale_latent_space", "vae_scale_factor"]
