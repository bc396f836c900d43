"""`selfext serve --parallel N --ga-keys FORM`: llama-server has no flag for the form of the grouped keys, so it gets
the form in its environment (LLAMA_SELF_EXTEND_KEYS), which libllama reads for the contexts that leave it to auto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from selfext_cpp import llama_server
from selfext_cpp.errors import ParameterError


class Started(Exception):
    """Raised by the stand-in for subprocess.Popen: what start() would run is recorded, nothing runs."""


@pytest.mark.parametrize(("keys", "env"), [("cache", "cache"), ("steps", "steps"), ("auto", None)])
def test_ga_keys_reaches_llama_server_in_its_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         keys: str, env: str | None) -> None:
    seen: dict[str, Any] = {}

    def popen(args: list[str], **kw: Any) -> None:
        seen.update(kw, args=args)
        raise Started

    monkeypatch.delenv("LLAMA_SELF_EXTEND_KEYS", raising=False)
    monkeypatch.setattr(llama_server, "binary", lambda: Path("/usr/bin/llama-server"))
    monkeypatch.setattr(llama_server.subprocess, "Popen", popen)
    cfg = llama_server.Config(model=tmp_path / "m.gguf", parallel=2, n_ctx_slot=64, n_ctx_train=64, ga_n=4, ga_w=16,
                              ga_keys=keys)
    with pytest.raises(Started):
        llama_server.start(cfg)
    assert seen["env"].get("LLAMA_SELF_EXTEND_KEYS") == env
    assert seen["args"][:2] == ["/usr/bin/llama-server", "-m"]


def test_an_unknown_form_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="is one of auto, steps, table, cache, not 'rows'"):
        llama_server.config(tmp_path / "missing.gguf", parallel=2, ga_keys="rows")
