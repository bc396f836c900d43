"""Fixtures for the RPC tests: a tiny GGUF trained on 256 tokens and a `selfext rpc-server` on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TESTS / "native"), str(TESTS / "server"), str(TESTS / "cli")]  # tinymodel, live_server

from rpcutil import RpcServer, start_rpc_server  # noqa: E402
from tinymodel import make_tiny_gguf  # noqa: E402

N_CTX_TRAIN = 256


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-weight llama (SPM vocab), 2 layers, trained context 256."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama.gguf"
    make_tiny_gguf(path, n_ctx_train=N_CTX_TRAIN)
    return path


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RpcServer]:
    """One `selfext rpc-server -t 2` per module."""
    server = start_rpc_server(tmp_path_factory.mktemp("rpc"))
    yield server
    server.kill()
