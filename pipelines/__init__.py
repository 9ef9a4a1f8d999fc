"""Inference pipelines. Imported lazily, so that `pipelines.files` needs neither diffusers nor transformers."""

from pipelines import quiet as _quiet

_quiet.install()  # before any library logs what does not concern a user

__all__ = ["CascadeOutput", "CascadePipeline", "LDMImg2ImgPipeline", "LDMInpaintPipeline", "LDMPipeline", "LDMXLImg2ImgPipeline",
           "LDMXLInpaintPipeline", "LDMXLPipeline",
           "SuperResolutionPipeline", "from_single_file", "low_res_scheduler", "rescale_latent_space",
           "to_single_file", "vae_scale_factor"]

_WHERE = {"CascadeOutput": "cascade", "CascadePipeline": "cascade", "LDMPipeline": "ldm_pipeline", "LDMXLPipeline": "sdxl", "LDMXLImg2ImgPipeline": "sdxl",
          "LDMXLInpaintPipeline": "sdxl",
          "vae_scale_factor": "latents", "SuperResolutionPipeline": "sr_pipeline",
          "low_res_scheduler": "sr_pipeline", "rescale_latent_space": "sr_pipeline",
          "LDMImg2ImgPipeline": "img2img", "LDMInpaintPipeline": "img2img", "to_single_file": "single_file",
          "from_single_file": "single_file"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
