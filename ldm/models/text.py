"""Text side: a CLIP tokenizer whose BPE vocabulary is learned from the training captions, and a
small CLIP text encoder to train with the U-Net when no pretrained one is given.

The vocabulary is laid out as CLIP's is: the 256 byte-level symbols, the same with the end-of-word
marker ``</w>``, then one token per learned merge, then the special tokens. Every byte has a token,
so no text ever maps to the unknown token; frequent caption words become single tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"


def _byte_symbols() -> list[str]:
    from tokenizers import pre_tokenizers

    # The byte-level alphabet (printable stand-ins for the 256 byte values), in byte order.
    from pipelines.architectures import clip_bytes

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    symbols = [chr(c) for _, c in sorted(zip(*clip_bytes()))]
    assert set(symbols) == set(alphabet)
    return symbols


def build_tokenizer(captions: Iterable[str], vocab_size: int = 1000, max_length: int = 16) -> CLIPTokenizer:
    """Learn BPE merges from ``captions`` with CLIP's own normalisation and pre-tokenisation."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    symbols = _byte_symbols()
    base = symbols + [s + EOW for s in symbols]
    if vocab_size < len(base) + 2:
        raise ValueError(f"vocab_size must be at least {len(base) + 2} (bytes, bytes{EOW}, 2 special), got {vocab_size}")
    # Borrow CLIP's normaliser and pre-tokeniser from an empty-merge CLIPTokenizer so that the merges
    # are learned on exactly the pieces the final tokenizer will see.
    template = CLIPTokenizer(vocab={s: i for i, s in enumerate(base + [BOS, EOS])}, merges=[])
    learner = Tokenizer(BPE(unk_token=EOS, end_of_word_suffix=EOW))
    learner.normalizer = template.backend_tokenizer.normalizer
    learner.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=symbols,
                         end_of_word_suffix=EOW, show_progress=False, min_frequency=1)
    learner.train_from_iterator(list(captions), trainer)
    merges = json.loads(learner.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    vocab = {s: i for i, s in enumerate(base)}
    kept = []
    for a, b in merges:
        if len(vocab) >= vocab_size - 2:
            break
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
        kept.append((a, b))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=kept, model_max_length=max_length)


def build_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int = 64, num_hidden_layers: int = 2,
                       num_attention_heads: int = 4, intermediate_size: int = 256, with_projection: bool = False):
    """A new CLIP text encoder over ``tokenizer``'s vocabulary: `CLIPTextModel`, or with ``with_projection``
    `CLIPTextModelWithProjection` (its pooled output projected to ``hidden_size``, as SDXL's second encoder)."""
    from transformers import CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]):
    """(B, max_length) token ids, padded and truncated to the tokenizer's model_max_length; multi-vector
    textual-inversion placeholders expanded as the pipelines expand them."""
    added = tokenizer.added_tokens_encoder
    if any(f"{t}_1" in added for t in added):  # diffusers' expansion, the one its pipelines apply to prompts
        from diffusers.loaders import TextualInversionLoaderMixin

        captions = TextualInversionLoaderMixin().maybe_convert_prompt(list(captions), tokenizer)
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def text_fingerprint(text_encoder, tokenizer: CLIPTokenizer) -> str:
    """A hash of what a caption's embedding depends on: the encoder's weights, the tokenizer's ids of a probe
    caption and its length; precomputed embeddings made under another fingerprint are not used."""
    from ldm.data.cache import Fingerprint

    probe = tokenize(tokenizer, ["a photo of a cat, 1girl, sks; 0123 ÄÖ"])
    return Fingerprint().tensors(text_encoder.state_dict()).value([probe.tolist(), "text-v1"]).hexdigest()


def report_truncated(tokenizer: CLIPTokenizer, captions: list[str]) -> int:
    """Log how many ``captions`` are longer than the tokenizer's length (the text encoder sees only their start),
    with examples of what it does not see; return that count."""
    import logging

    from pipelines.ldm_pipeline import truncated_parts

    cut = [lost for lost in truncated_parts(tokenizer, captions) if lost]
    if cut:
        logging.getLogger(__name__).warning(
            "%d of %d captions are longer than the text encoder's %d tokens and lose their end, e.g. %s", len(cut),
            len(captions), tokenizer.model_max_length, [f"...{lost!r}" for lost in cut[:3]])
    return len(cut)
