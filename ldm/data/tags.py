"""Tag captions (``1girl, red hair, smiling, outdoors``) changed every step as the community's trainers change
them: the tags after the first ``keep_tokens`` shuffled and each dropped with probability ``dropout``, the kept
ones (a trigger word, a character's name) staying in front in their order."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TagRules:
    """How one source's captions change each step (kohya-ss's ``shuffle_caption``, ``keep_tokens`` and
    ``caption_tag_dropout_rate``); tags are separated by commas."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout > 0

    def apply(self, caption: str, rng: random.Random) -> str:
        """``caption`` with its tags after the first ``keep_tokens`` dropped and shuffled by ``rng``."""
        if not self.active:
            return caption
        tags = [t.strip() for t in caption.split(",")]
        tags = [t for t in tags if t]
        kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        if self.dropout > 0:
            rest = [t for t in rest if rng.random() >= self.dropout]
        if self.shuffle:
            rng.shuffle(rest)
        return ", ".join(kept + rest)
