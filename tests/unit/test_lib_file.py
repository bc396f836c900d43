"""The file names of a build's shared libraries (libllama, libggml) on each platform."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from selfext_cpp._lib import lib_file


@pytest.mark.parametrize("name", ["llama", "ggml"])
def test_linux_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    assert lib_file(tmp_path, name) == tmp_path / f"lib{name}.so"


def test_default_is_libllama(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    assert lib_file(tmp_path) == tmp_path / "libllama.so"


def test_windows_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    assert lib_file(tmp_path, "ggml") == tmp_path / "ggml.dll"


def test_macos_takes_the_dylib_that_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    (tmp_path / "libggml.dylib").touch()
    assert lib_file(tmp_path, "ggml") == tmp_path / "libggml.dylib"
    # a macOS build of shared objects (no .dylib of that name) keeps .so
    assert lib_file(tmp_path, "llama") == tmp_path / "libllama.so"
