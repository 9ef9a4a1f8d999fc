"""Inference pipelines."""

from .cascade import CascadeOutput, CascadePipeline
from .ldm_pipeline import LDMPipeline, vae_scale_factor
from .sr_pipeline import SuperResolutionPipeline, low_res_scheduler, rescale_latent_space

__all__ = ["CascadeOutput", "CascadePipeline", "LDMPipeline", "SuperResolutionPipeline", "low_res_scheduler",
           "rescale_latent_space", "vae_scale_factor"]
