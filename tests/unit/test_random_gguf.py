"""benchmarks/random_gguf.py writes models that our libllama loads and decodes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "random_gguf.py"


@pytest.mark.parametrize("shape", ["tiny", "gemma3-tiny"])  # llama; gemma3 with sliding-window layers
def test_random_model_loads_and_generates(tmp_path: Path, shape: str) -> None:
    pytest.importorskip("gguf")
    spec = importlib.util.spec_from_file_location("random_gguf", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "tiny.gguf"
    mod.write(str(path), shape, n_ctx_train=256)

    from selfext_cpp import self_extend_fused
    from selfext_cpp.engine import load

    llm = load(str(path), n_ctx=512, ga_n=4, ga_w=64, verbose=False)
    assert llm._model.n_ctx_train() == 256
    assert self_extend_fused(llm)  # flash attention on by default: the fused op on the CPU
    tokens = llm.tokenize(b"hello world " * 20)
    assert len(tokens) > 100  # byte fallback: every character is a token
    out = llm.create_completion("hello world " * 20, max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] >= 1
