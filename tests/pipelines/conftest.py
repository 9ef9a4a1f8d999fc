"""Fixtures of the pipeline tests: a tiny byte-level CLIP tokenizer folder."""

import pytest
from tiny_models import write_tiny_clip_vocab


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_clip_tokenizer")
    write_tiny_clip_vocab(directory)
    return directory
