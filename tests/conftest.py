"""Shared fixtures: the real embedded Gemma (converted once, cached) and the tiny random Gemma."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

import nbutils  # noqa: E402,F401  (sets KERAS_BACKEND=jax before Keras loads)
from nbutils import paths  # noqa: E402

SHARED_ALPACA = paths.REPO_ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


@pytest.fixture(scope="session")
def real_lm():
    """Gemma 3 270M base from the embedded GGUF (first run converts it, ~35 s)."""
    from nbutils import models

    return models.load_gemma(models.LOCAL_MODEL, sequence_length=256)


@pytest.fixture(scope="session")
def tiny_lm():
    """2-layer random Gemma 3 with the real tokenizer."""
    from nbutils import models

    return models.load_gemma(models.TINY_MODEL, sequence_length=64)


@pytest.fixture(scope="session")
def tokenizer():
    """The real Gemma 3 tokenizer (no weights loaded)."""
    from nbutils import models

    return models.local_tokenizer()


@pytest.fixture(scope="session")
def gguf_reader():
    """The embedded GGUF, parsed once (~9 s)."""
    from nbutils import gguf_port, models

    return gguf_port.read_gguf(models.embedded_gguf()[0])
