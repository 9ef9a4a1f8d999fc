"""Latent diffusion: train, fine-tune and run text-to-image models (VAE + CLIP text encoder + U-Net)."""

from pipelines import quiet as _quiet

_quiet.install()  # before any library logs what does not concern a user

_PIPELINES = ("LDMPipeline", "LDMXLPipeline", "LDMXLImg2ImgPipeline", "LDMXLInpaintPipeline", "LDMImg2ImgPipeline", "LDMInpaintPipeline", "SuperResolutionPipeline", "CascadePipeline")

__all__ = [*_PIPELINES, "GaussianDiffusion"]


def __getattr__(name):
    # Imported lazily so that `import ldm` stays light and `from ldm import LDMPipeline` works.
    if name in _PIPELINES:
        import pipelines

        return getattr(pipelines, name)
    if name == "GaussianDiffusion":
        from ldm.diffusion.gaussian import GaussianDiffusion

        return GaussianDiffusion
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
