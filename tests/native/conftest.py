"""Fixtures shared by the native tests: the four tiny models (RoPE NORM/NEOX × MHA/GQA) and runners on them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tinymodel import LlamaRunner, RunnerFactory, TinyModel, make_tiny_gguf

MODELS = {  # id: (arch, n_head_kv); n_head = 4; llama: RoPE NORM (adjacent pairs), qwen2: RoPE NEOX (halves)
    "llama-mha": ("llama", 4),
    "llama-gqa": ("llama", 2),
    "qwen2-mha": ("qwen2", 4),
    "qwen2-gqa": ("qwen2", 1),
}

@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    arch, n_head_kv = MODELS[request.param]
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    return make_tiny_gguf(path, arch=arch, n_head_kv=n_head_kv, seed=len(request.param))


@pytest.fixture
def attn_path() -> str:
    """Which attention path runners take by default: "generic" (flash attention off) or "fused..." (on)."""
    return "generic"


@pytest.fixture
def runner_for(model: TinyModel, attn_path: str) -> Iterator[RunnerFactory]:
    """Factory of LlamaRunners on ``model`` (n_ctx 256 unless given), all closed after the test."""
    made: list[LlamaRunner] = []

    def make(path: Path | None = None, **kw: Any) -> LlamaRunner:
        kw.setdefault("n_ctx", 256)
        kw.setdefault("flash_attn", attn_path.startswith("fused"))
        made.append(LlamaRunner(path or model.path, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()
