"""Latent diffusion: train, fine-tune and run text-to-image models (VAE + CLIP text encoder + U-Net)."""

__all__ = ["LDMPipeline", "GaussianDiffusion"]


def __getattr__(name):
    # Imported lazily so that `import ldm` stays light and `from ldm import LDMPipeline` works.
    if name == "LDMPipeline":
        from pipelines import LDMPipeline

        return LDMPipeline
    if name == "GaussianDiffusion":
        from .diffusion import GaussianDiffusion

        return GaussianDiffusion
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
