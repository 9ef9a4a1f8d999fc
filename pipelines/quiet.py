"""Messages of the libraries underneath that do not concern a user of this project, dropped where they are
logged (and only those): transformers' notice that its image processors fall back from torchvision to PIL (no image
processor is used here: the safety checker is off)."""

from __future__ import annotations

import logging

DROPPED = {"transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",)}


class _Drop(logging.Filter):
    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


def install() -> None:
    """Add the filters (once)."""
    for name, parts in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(parts))
