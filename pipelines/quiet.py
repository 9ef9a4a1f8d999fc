"""Messages of the libraries underneath that do not concern a user of this project, dropped where they are
logged (and only those):

- transformers' notice that its image processors fall back from torchvision to PIL (no image processor is used
  here: the safety checker is off);
- diffusers' warning that no module "should be kept in float32" (an empty list) when a model is cast;
- diffusers' note that a LoRA file has no text-encoder keys (most have none; a file whose modules are not all
  found is refused by `ldm.methods.lora.load_lora_checked`, naming them);
- transformers' note on how it starts the rows of new tokens (a textual inversion's, which the loader then
  overwrites with the embedding);
- transformers' per-file "Loading weights" and "Writing model shards" bars (its own switch), which interleave with
  the project's progress bars for the fraction of a second each takes."""

from __future__ import annotations

import logging

DROPPED = {"transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
           "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
           "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
           "diffusers.loaders.peft": ("No LoRA keys associated to",),
           # a textual inversion's new token rows, which the loader then sets to the embedding's vectors
           "transformers.modeling_utils": ("The new embeddings will be initialized from a multivariate normal",)}


class _Drop(logging.Filter):
    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


def install() -> None:
    """Add the filters (once) and turn transformers' bars off."""
    for name, parts in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(parts))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
