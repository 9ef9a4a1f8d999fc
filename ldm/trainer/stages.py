"""The stages the trainer trains, by the name ``stage:`` gives in the config."""

from __future__ import annotations

from ldm.trainer.stage import TextToImage
from ldm.trainer.superres import SuperResolution

STAGES = {"base": TextToImage, "super_resolution": SuperResolution}


def stage_for(cfg) -> TextToImage:
    """The run's stage (its config checked)."""
    return STAGES[cfg.stage](cfg)
