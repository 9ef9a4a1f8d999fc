"""Inference pipelines."""

from .ldm_pipeline import LDMPipeline

__all__ = ["LDMPipeline"]
