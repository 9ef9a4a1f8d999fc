"""What a diffusion run leaves behind: the pipeline folder (EMA weights when EMA is on), under LoRA the
adapters alone and, when asked, a pipeline with them merged in, under textual inversion the new embeddings.
Main process only; every folder is written beside its target and swapped in when complete."""

from __future__ import annotations

from pathlib import Path

from ldm.methods.lora import lora_file, merge_into, save_lora
from ldm.models.components import make_pipeline, pretrained_folder
from pipelines.files import atomic_save_dir
from ldm.diffusion.schedulers import sampling_scheduler



def export(cfg, comp, unet, text_encoder, run_dir: Path) -> dict[str, Path]:
    """Write the run's model(s) from the unwrapped ``unet`` and ``text_encoder``; return {what: path}."""
    saved = {}
    fc = cfg.finetune
    if fc.method == "textual_inversion":
        from ldm.methods.textual_inversion import EMBEDS_FILE, learned_embeddings, save_embeddings

        vectors = learned_embeddings(text_encoder, comp.tokenizer, fc)
        atomic_save_dir(lambda d: save_embeddings(d, fc.placeholder_token, vectors), run_dir / "textual_inversion")
        saved["textual_inversion"] = run_dir / "textual_inversion" / EMBEDS_FILE
    elif cfg.finetune.method == "lora":
        atomic_save_dir(lambda d: save_lora(d, unet, text_encoder, cfg.finetune.lora_format), run_dir / "lora")
        saved["lora"] = lora_file(run_dir / "lora")
        if cfg.finetune.merged_export:
            from pipelines import LDMPipeline

            merged = merge_into(LDMPipeline.from_pretrained(pretrained_folder(cfg)), run_dir / "lora",
                                cfg.finetune.merge_scale)
            merged.scheduler = sampling_scheduler(comp.scheduler, cfg.sample.scheduler)
            atomic_save_dir(lambda d: merged.save_pretrained(d, safe_serialization=True), run_dir / "pipeline")
            saved["pipeline"] = run_dir / "pipeline"
    else:
        pipe = make_pipeline(comp, unet.eval(), text_encoder.eval(), cfg.sample.scheduler)
        if comp.upscale_factor is not None and pipe.vae is not None:
            # diffusers' upscaler decodes with its fixed factor: carry the VAE with its latent space rescaled to it
            # (an exact reparametrisation: the same scaled latents, the same images).
            from pipelines import rescale_latent_space

            pipe.register_modules(vae=rescale_latent_space(pipe.vae))
        atomic_save_dir(lambda d: pipe.save_pretrained(d, safe_serialization=True), run_dir / "pipeline")
        saved["pipeline"] = run_dir / "pipeline"
    return saved
