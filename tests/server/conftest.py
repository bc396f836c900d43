"""Fixtures for the server tests: a tiny GGUF trained on 64 tokens, and servers on it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "native"))  # tinymodel

from live_server import N_CTX_TRAIN, SELF_EXTEND_ARGS, LiveServer, StartServer, start  # noqa: E402
from tinymodel import make_tiny_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama GGUF with a 1024-token vocabulary whose words w0..w700 are single tokens."""
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    make_tiny_gguf(path, n_ctx_train=N_CTX_TRAIN, vocab_size=1024, seed=3)
    return path


@pytest.fixture(scope="module")
def start_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """start_server(*args) -> a LiveServer on the tiny model; every one is stopped when the module ends."""
    servers: list[LiveServer] = []

    def start_one(*args: str, env: dict[str, str] | None = None) -> LiveServer:
        server = start(tiny_model, *args, log_dir=tmp_path_factory.mktemp("server"), env=env)
        servers.append(server)
        return server

    yield start_one
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(start_server: StartServer) -> LiveServer:
    """One server per module with Self-Extend G=4 W=16 (capacity 208), logprobs, and its verbose log."""
    return start_server(*SELF_EXTEND_ARGS, "--logprobs", "--verbose")
