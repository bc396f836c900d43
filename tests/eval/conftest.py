"""Fixtures for the evaluation harness tests: tiny random-weight GGUFs (see tests/native/tinymodel.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "native"))

from tinymodel import TinyModel, make_tiny_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A 2-layer llama-architecture model trained (nominally) on 64 tokens; byte-level SPM vocab."""
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", n_ctx_train=64)


@pytest.fixture(scope="session")
def tiny_one_layer(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """One layer: the K/V of every cached token depend only on its embedding, so the last token's logits are a
    function of the cells' final positions alone (what the shift test needs)."""
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny1.gguf", n_layer=1, n_ctx_train=64, seed=3)
