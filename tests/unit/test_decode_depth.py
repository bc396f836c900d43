"""benchmarks/decode_depth.py saves the document's cache once, then alternates vanilla and each form in processes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def decode_depth() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # it imports its helpers from ttft.py, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location("decode_depth", BENCH / "decode_depth.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_settings_alternate_after_one_save_and_ratios_are_against_vanilla(
        decode_depth: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[str, str, bool]] = []
    speed = {"": [10.0, 12.0, 11.0], "steps": [9.0, 9.9, 9.5], "cache": [11.0, 11.0, 11.0]}

    def fake_run(cmd, env, **kw):
        form = env.get("LLAMA_SELF_EXTEND_KEYS", "")
        ga_n = cmd[cmd.index("--ga-n") + 1]
        calls.append((ga_n, form, "--save" in cmd))
        assert cmd[cmd.index("--state") + 1].endswith("cache.bin")
        out = "" if "--save" in cmd else json.dumps({"decode_tps": speed[form].pop(0)}) + "\n"
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.delenv("LLAMA_SELF_EXTEND_KEYS", raising=False)
    monkeypatch.setattr(decode_depth.subprocess, "run", fake_run)
    monkeypatch.setattr("sys.argv", ["decode_depth.py", "m.gguf", "--tokens", "1k", "--forms", "steps,cache",
                                     "--rounds", "3", "--ga-n", "4", "--json"])
    decode_depth.main()
    assert calls[0] == ("1", "", True)  # the document, once, vanilla
    assert calls[1:] == [("1", "", False), ("4", "steps", False), ("4", "cache", False)] * 3
    got = json.loads(capsys.readouterr().out)
    assert got["n_tokens"] == 1024
    assert got["results"]["vanilla"]["median"] == 11.0
    assert got["results"]["steps"]["ratio"] == round(9.5 / 11.0, 3)
    assert got["results"]["cache"]["ratio"] == 1.0


def test_a_failing_process_stops_the_benchmark_with_its_error(
        decode_depth: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="out of memory")

    monkeypatch.setattr(decode_depth.subprocess, "run", fake_run)
    monkeypatch.setattr("sys.argv", ["decode_depth.py", "m.gguf", "--tokens", "1k"])
    with pytest.raises(SystemExit, match="out of memory"):
        decode_depth.main()
