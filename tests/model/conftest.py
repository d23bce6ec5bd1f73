"""Fixtures for the loader and tokenizer tests, built on the session fixtures of
tests/conftest.py (`loaded_default`, `hf_default`) so that a full run loads the default
model, and transformers' copy of it, only once.

Imports transformers lazily (only the fixtures that compare against it need it).
"""
import os

import pytest


@pytest.fixture(scope="session")
def default_model(loaded_default):
    """`LoadedModel` of the embedded SmolLM2 GGUF (about 5 s on 2 cores, once per session)."""
    return loaded_default


@pytest.fixture(scope="session")
def default_gguf():
    """(directory, file name) of the embedded GGUF, the way transformers wants them."""
    from loong.model.default_model import default_model_path

    path = default_model_path()
    return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf):
    """transformers' own tokenizer built from the same GGUF (the reference)."""
    transformers = pytest.importorskip("transformers")
    folder, name = default_gguf
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
