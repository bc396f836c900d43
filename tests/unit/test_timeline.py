"""benchmarks/timeline.py reads a CUPTI timeline into per-run GPU time and per-decode host time."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def timeline() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # timeline.py imports its neighbour ttft.py
    try:
        spec = importlib.util.spec_from_file_location("timeline", BENCH / "timeline.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def kernel(name: str, ts: float, dur: float) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


def mark(name: str, ts: float, dur: float) -> dict:  # a record_function range
    return {"cat": "user_annotation", "name": name, "ts": ts, "dur": dur}


def call(name: str, ts: float) -> dict:  # a CUDA runtime call
    return {"cat": "cuda_runtime", "name": name, "ts": ts, "dur": 5}


def printed(timeline: ModuleType, capsys: pytest.CaptureFixture[str], events: list[dict]) -> str:
    timeline.report(events)
    return capsys.readouterr().out


def test_busy_time_counts_overlapping_kernels_once(timeline: ModuleType) -> None:
    ks = [kernel("a", 0, 10), kernel("b", 5, 10), kernel("c", 30, 5), kernel("d", 31, 1)]  # us
    assert timeline.busy_ms(ks) == pytest.approx((15 + 5) / 1e3)
    assert timeline.busy_ms([]) == 0


def test_report_gives_runs_kernels_and_host_time_per_decode(timeline: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    out = printed(timeline, capsys, [
        mark("run0", 0, 1000), mark("decode", 100, 400),
        call("cudaLaunchKernel", 300),  # 200 us after the decode began
        kernel("void flash_attn_ext_se_f16<128, false>(params)", 320, 100),
        kernel("void flash_attn_ext_se_f16<128, false>(params)", 400, 100),
        kernel("rope_norm", 600, 50),
        kernel("outside", 2000, 50),
    ])
    assert "run0: wall 1.0 ms, kernels 3 summing 0.2 ms, GPU busy 0.2 ms" in out
    assert "0.20     0.18      2  flash_attn_ext_se_f16" in out  # the second starts 20 us before the first ends
    assert "0.20 ms on the host before its first CUDA call, 0.20 ms from there to its return" in out


def test_report_gives_the_single_token_decodes_per_step(timeline: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    out = printed(timeline, capsys, [
        mark("run0", 0, 3000), mark("steps", 1000, 1000), mark("decode", 1000, 400), mark("decode", 1500, 400),
        mark("decode", 1900, 100),
        call("cudaGraphLaunch", 1050), call("cudaGraphLaunch", 1550), call("cudaMemcpyAsync", 1560),
        kernel("rope_norm", 1100, 10), kernel("flash_attn_ext_se_f16", 1110, 30),
        kernel("rope_norm", 1600, 10), kernel("flash_attn_ext_se_f16", 1610, 50),
        kernel("before the steps", 200, 500),
    ])
    # 3 steps in 1 ms; from start to start 500 and 400 us
    assert "per step (median of 1 runs of 3): wall 0.333 ms (median step 0.450 ms), kernels 0.033 ms, GPU busy 0.033 ms" in out
    assert "26.67    26.67 0.666667  flash_attn_ext_se_f16" in out
    assert "6.67     6.67 0.666667  rope_norm" in out
    assert "CUDA calls per step: cudaGraphLaunch 0.666667, cudaMemcpyAsync 0.333333" in out


def test_a_chained_kernel_costs_only_what_it_adds_to_the_busy_time(timeline: ModuleType) -> None:
    # b launches early and waits for a (launch chains): 15 us of duration, 10 us past a's end
    a, b, c = kernel("a", 0, 30), kernel("b", 25, 15), kernel("c", 100, 5)
    shares = {k["name"]: share for k, share in timeline.busy_shares([c, b, a])}
    assert shares == {"a": 30, "b": 10, "c": 5}
    assert timeline.busy_ms([a, b, c]) == pytest.approx(45 / 1e3)


def test_swa_full_reaches_the_model_load(timeline: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    import selfext_cpp

    parsed = []
    monkeypatch.setattr(timeline, "record", lambda args: parsed.append(args) or [])
    monkeypatch.setattr(timeline, "report", lambda events: None)
    monkeypatch.setattr(selfext_cpp, "load", lambda model, **kw: kw)
    for flag, expected in (("on", True), ("off", False)):
        monkeypatch.setattr("sys.argv", ["timeline.py", "m.gguf", "--swa-full", flag])
        timeline.main()
        assert timeline.load_model(parsed.pop(), 512, verbose=False)["swa_full"] is expected


class FakeProfile:
    """torch.profiler.profile's part that record() uses: a context whose trace holds one kernel per decode."""

    def __init__(self, log: list[str], **kw: object) -> None:
        self.log = log

    def __enter__(self) -> FakeProfile:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def export_chrome_trace(self, path: str) -> None:
        import json

        with open(path, "w") as f:
            json.dump({"traceEvents": [kernel(name, i, 1) for i, name in enumerate(self.log)]}, f)


class FakeModel:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self._ctx = type("Ctx", (), {"decode": lambda _, batch: log.append(f"decode {batch}")})()

    def tokenize(self, text: bytes, add_bos: bool) -> list[int]:
        return [1, 2, 3, 4]

    def reset(self) -> None:
        self.log.append("reset")

    def eval(self, tokens: list[int]) -> None:
        self._ctx.decode(len(tokens))


def test_record_runs_the_warm_up_then_the_documents_and_decodes(
        timeline: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import contextlib
    import types

    log: list[str] = []
    torch = types.ModuleType("torch")
    torch.zeros = lambda *a, **kw: None  # type: ignore[attr-defined]
    profiler = types.ModuleType("torch.profiler")
    profiler.ProfilerActivity = types.SimpleNamespace(CPU="cpu", CUDA="cuda")  # type: ignore[attr-defined]
    profiler.profile = lambda **kw: FakeProfile(log, **kw)  # type: ignore[attr-defined]
    profiler.record_function = lambda name: contextlib.nullcontext()  # type: ignore[attr-defined]
    torch.profiler = profiler  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch.profiler", profiler)
    monkeypatch.setattr(timeline, "load_model", lambda args, n_ctx, verbose: FakeModel(log))
    args = types.SimpleNamespace(tokens=10, repeats=2, decodes=3, trace=str(tmp_path / "t.json.gz"))

    events = timeline.record(args)
    # a warm-up and two documents, each reset, the document, its first token and the 3 decodes
    assert log == 3*["reset", "decode 10", "decode 1", "decode 1", "decode 1", "decode 1"]
    assert len(events) == len(log)
    assert (tmp_path / "t.json.gz").stat().st_size > 0
