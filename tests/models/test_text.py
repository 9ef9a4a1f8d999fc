"""The caption-built CLIP tokenizer: whole-word tokens for caption words, no unknown tokens, round trips."""

from transformers import CLIPTokenizer

from ldm.data.builtin import shapes_caption, shapes_combos
from ldm.models.text import build_text_encoder, build_tokenizer, tokenize

CAPTIONS = [shapes_caption(*c) for c in shapes_combos()] + [f"a handwritten digit {d}" for d in range(10)]


def test_every_caption_word_is_one_real_token(tmp_path):
    tok = build_tokenizer(CAPTIONS, vocab_size=700, max_length=16)
    for caption in CAPTIONS:
        ids = tok(caption).input_ids
        pieces = tok.convert_ids_to_tokens(ids)[1:-1]
        assert pieces == [w + "</w>" for w in caption.split()]
        assert tok.unk_token_id not in ids[1:-1]
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again(CAPTIONS[0]).input_ids == tok(CAPTIONS[0]).input_ids and again.model_max_length == 16


def test_unseen_words_fall_back_to_bytes_not_unknown():
    tok = build_tokenizer(CAPTIONS, vocab_size=700)
    ids = tok("A teal Star, at the bottom-right! ünïcode").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "atealstar,atthebottom-right!ünïcode"


def test_text_encoder_shapes():
    tok = build_tokenizer(CAPTIONS, vocab_size=700, max_length=16)
    enc = build_text_encoder(tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ids = tokenize(tok, CAPTIONS[:3])
    assert ids.shape == (3, 16)
    assert enc(ids)[0].shape == (3, 16, 32)
