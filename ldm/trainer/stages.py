"""The stages the trainer trains, by the name ``stage:`` gives in the config, and the base stage of each other
model family, picked by the family of ``model.pretrained`` (`pipelines.families`)."""

from __future__ import annotations

from ldm.trainer.sdxl import XLTextToImage
from ldm.trainer.stage import TextToImage
from ldm.trainer.superres import SuperResolution

STAGES = {"base": TextToImage, "super_resolution": SuperResolution}
FAMILY_STAGES = {"sdxl": XLTextToImage}  # a family's text-to-image stage; Stable Diffusion 1.x/2.x: STAGES


def stage_class(cfg) -> type[TextToImage]:
    """The class of the run's stage: the pretrained model's family's, else the one ``stage`` names."""
    from pipelines.families import family_of

    family = family_of(cfg.model.pretrained) if cfg.model.pretrained else None
    return FAMILY_STAGES.get(family, STAGES[cfg.stage])


def stage_for(cfg) -> TextToImage:
    """The run's stage (its config checked)."""
    return stage_class(cfg)(cfg)
