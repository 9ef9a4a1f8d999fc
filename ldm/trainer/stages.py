"""The stages the trainer trains, by the name ``stage:`` gives in the config, and the base stage of each other
model family, picked by the family of ``model.pretrained`` (`pipelines.families`) or ``model.family``."""

from __future__ import annotations

from ldm.trainer.sdxl import XLTextToImage
from ldm.trainer.stage import TextToImage
from ldm.trainer.superres import SuperResolution

STAGES = {"base": TextToImage, "super_resolution": SuperResolution}
FAMILY_STAGES = {"sdxl": XLTextToImage}  # a family's text-to-image stage; Stable Diffusion 1.x/2.x: STAGES


def model_family(cfg) -> str:
    """The run's model family: ``model.pretrained``'s (``model.family``, when set, must agree), else
    ``model.family`` (sd when unset)."""
    from pipelines.families import family_of

    family = family_of(cfg.model.pretrained) if cfg.model.pretrained else None
    if family is not None and cfg.model.family not in (None, family):
        raise ValueError(f"model.family={cfg.model.family} but model.pretrained={cfg.model.pretrained!r} holds a "
                         f"{family} model: leave model.family unset to train it")
    return family or cfg.model.family or "sd"


def stage_class(cfg) -> type[TextToImage]:
    """The class of the run's stage: the model family's, else the one ``stage`` names."""
    return FAMILY_STAGES.get(model_family(cfg), STAGES[cfg.stage])


def stage_for(cfg) -> TextToImage:
    """The run's stage (its config checked)."""
    return stage_class(cfg)(cfg)
