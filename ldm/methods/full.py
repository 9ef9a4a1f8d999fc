"""The full fine-tune (and training from scratch): every U-Net weight, and the text encoder's when it trains."""

from __future__ import annotations

from pathlib import Path

from ldm.methods.base import ExportJob, Method


class FullFinetune(Method):
    """Every U-Net weight trains; the text encoder too when ``model.train_text_encoder`` (or a model built from
    scratch) says so, at ``train.text_encoder_learning_rate``. Exports the stage's pipeline folder."""

    families = ("sd", "sdxl")

    def trainable(self, cfg, comp) -> list[dict]:
        tc = cfg.train
        for encoder in comp.text_encoders():
            encoder.requires_grad_(comp.train_text_encoder)
        groups = [{"params": list(comp.unet.parameters()), "lr": tc.learning_rate}]
        if comp.train_text_encoder:
            groups.append({"params": [p for encoder in comp.text_encoders() for p in encoder.parameters()],
                           "lr": tc.text_encoder_learning_rate or tc.learning_rate})
        return groups

    def export(self, job: ExportJob) -> dict[str, Path]:
        return job.save_pipeline()
