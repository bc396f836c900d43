"""benchmarks/ttft.py pools the timed runs of several processes of one setting and passes its settings (and forms of
the grouped keys) to them."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def ttft() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ttft", BENCH / "ttft.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def process(prefill: list[float], decode: list[float]) -> dict:
    return {"mode": "vanilla", "memory_mib": {"total": 10.0}, "prefill_tps": prefill, "decode_tps": decode,
            "prefill_median": sorted(prefill)[len(prefill) // 2], "decode_median": sorted(decode)[len(decode) // 2]}


def test_pooled_takes_the_median_of_every_run_of_every_process(ttft: ModuleType) -> None:
    # a slow process and two fast ones: the pooled median is a fast run's, each process's own median is kept
    row = ttft.pooled([process([50, 52, 51], [5, 5, 5]), process([80, 81, 82], [6, 6, 7]), process([79, 83, 80], [6, 7, 7])])
    assert row["prefill_tps"] == [50, 52, 51, 80, 81, 82, 79, 83, 80]
    assert row["prefill_median"] == 80
    assert row["prefill_process_medians"] == [51, 81, 80]
    assert row["decode_median"] == 6
    assert row["memory_mib"] == {"total": 10.0}


def test_one_process_is_its_own_row(ttft: ModuleType) -> None:
    one = process([10, 30, 20], [1, 2, 3])
    row = ttft.pooled([one])
    assert row["prefill_median"] == 20 and row["decode_median"] == 2
    assert "prefill_process_medians" not in row
    assert row["prefill_tps"] == [10, 30, 20]


def test_processes_flag_alternates_vanilla_and_selfext(ttft: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def fake_measure(args, n_tokens, ubatch, ga_n, form="auto"):
        calls.append(ga_n)
        row = process([100.0 if ga_n == 1 else 95.0], [10.0])
        return {**row, "mode": "vanilla" if ga_n == 1 else "selfext", "n_tokens": n_tokens, "ubatch": ubatch}

    monkeypatch.setattr(ttft, "measure", fake_measure)
    monkeypatch.setattr("sys.argv", ["ttft.py", "m.gguf", "--tokens", "1k", "--ubatch", "512", "--processes", "3", "--json"])
    ttft.main()
    assert calls == [1, 8, 1, 8, 1, 8]
    out = capsys.readouterr().out
    assert '"processes": 3' in out and '"prefill": 0.95' in out


def test_swa_full_reaches_each_child_process(ttft: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cmds = []

    def fake_run(cmd, **kw):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"prefill_tps": [1.0], "decode_tps": [1.0]}\n',
                                           stderr="llama_kv_cache: size =    1.00 MiB\n")

    monkeypatch.setattr(ttft.subprocess, "run", fake_run)
    monkeypatch.setattr("sys.argv", ["ttft.py", "m.gguf", "--tokens", "1k", "--ubatch", "512", "--swa-full", "off",
                                     "--json"])
    ttft.main()
    assert len(cmds) == 2 and all(c[c.index("--swa-full") + 1] == "off" for c in cmds)
    assert '"swa_full": "off"' in capsys.readouterr().out


def test_processes_report_the_range_of_their_pairs(ttft: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # the second pair ran on a slower host: its ratio is the low end, the pooled ratio stays the medians'
    speeds = iter([(100.0, 10.0), (97.0, 9.5), (80.0, 10.0), (68.0, 9.0), (101.0, 10.0), (98.0, 10.0)])

    def fake_measure(args, n_tokens, ubatch, ga_n, form="auto"):
        prefill, decode = next(speeds)
        return {**process([prefill], [decode]), "mode": "vanilla" if ga_n == 1 else "selfext"}

    monkeypatch.setattr(ttft, "measure", fake_measure)
    monkeypatch.setattr("sys.argv", ["ttft.py", "m.gguf", "--tokens", "1k", "--ubatch", "512", "--processes", "3"])
    ttft.main()
    line = capsys.readouterr().out
    assert "(0.970)" in line  # 97 / 100: the pooled medians
    assert "pairs: prefill 0.850-0.970, decode 0.900-1.000" in line
    assert ttft.pair_range([process([100.0], [1.0])], [process([95.0], [1.0])], "prefill") == [0.95, 0.95]


def test_forms_run_each_in_its_own_processes_with_its_setting(ttft: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # per process round: vanilla, then each form; only Self-Extend's children get LLAMA_SELF_EXTEND_KEYS
    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", "cache")
    children = []

    def fake_run(cmd, **kw):
        ga_n = int(cmd[cmd.index("--ga-n") + 1])
        children.append((ga_n, kw["env"].get("LLAMA_SELF_EXTEND_KEYS")))
        tps = 100.0 if ga_n == 1 else 90.0 if kw["env"]["LLAMA_SELF_EXTEND_KEYS"] == "steps" else 80.0
        return subprocess.CompletedProcess(cmd, 0, stdout=f'{{"prefill_tps": [{tps}], "decode_tps": [10.0]}}\n',
                                           stderr="llama_kv_cache: size =    1.00 MiB\n")

    monkeypatch.setattr(ttft.subprocess, "run", fake_run)
    monkeypatch.setattr("sys.argv", ["ttft.py", "m.gguf", "--tokens", "1k", "--ubatch", "512", "--processes", "2",
                                     "--forms", "steps,table"])
    ttft.main()
    assert children == [(1, "cache"), (8, "steps"), (8, "table")] * 2  # vanilla keeps the environment as it is
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "steps" in lines[0] and "(0.900)" in lines[0]
    assert "table" in lines[1] and "(0.800)" in lines[1]


def test_auto_leaves_the_environments_form(ttft: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", "table")
    assert ttft.keys_environ("auto")["LLAMA_SELF_EXTEND_KEYS"] == "table"
    assert ttft.keys_environ(None)["LLAMA_SELF_EXTEND_KEYS"] == "table"
    assert ttft.keys_environ("steps")["LLAMA_SELF_EXTEND_KEYS"] == "steps"
