"""The fine-tuning methods, by the name ``finetune.method`` gives in the config."""

from __future__ import annotations

from ldm.methods.base import Method
from ldm.methods.full import FullFinetune
from ldm.methods.lora import LoRA
from ldm.methods.textual_inversion import TextualInversion

METHODS: dict[str, Method] = {"full": FullFinetune(), "lora": LoRA(), "textual_inversion": TextualInversion()}


def method_for(cfg) -> Method:
    """The run's fine-tuning method."""
    return METHODS[cfg.finetune.method]
