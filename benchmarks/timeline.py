"""Where the time of a whole-document prefill goes on a CUDA build: kernels, GPU idle time, host time per decode.

One process, one setting: the model is loaded, one untimed warm-up document is read, then ``--repeats`` documents
(reset + eval + the first token after) run under a CUPTI timeline (torch.profiler: kernels, copies, CUDA runtime
calls; torch is only the recorder). Printed per run: wall time, the sum of kernel times and the time the GPU was
busy; then the kernels of one run by total time (with each kernel's share of the busy time, which under launch chains
is what it costs: ``busy_shares``), and per llama_decode the host time before its first CUDA call
(graph build, scheduling, inputs) and after it (launches, waits). ``--decodes N`` adds N single-token decodes to
each run and reports their kernels per step apart. Run it once per setting and compare:

    python benchmarks/timeline.py llama-8b.gguf --ga-n 1 --ubatch 512 --tokens 8192      # vanilla
    python benchmarks/timeline.py llama-8b.gguf --ga-n 8 --ubatch 512 --tokens 8192      # Self-Extend, G8 W1024

``--swa-full off`` gives sliding-window layers a cache of their window, as in ttft.py.
``--trace out.json.gz`` keeps the whole timeline (chrome://tracing, Perfetto). Needs a GPU, torch with CUDA and a
CUDA build of selfext; the document is the filler of benchmarks/ttft.py. Results: docs/RESULTS.md, section 4.5.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import os
import statistics
import tempfile
import time
from typing import Any

from ttft import add_swa_full, document, load_model


def record(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs the documents under the profiler; returns the timeline's events."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.zeros(1, device="cuda")  # the recorder's CUDA context first
    llm = load_model(args, args.tokens + 64, verbose=False)
    unit, doc = document(llm, args.tokens)
    decode = llm._ctx.decode

    def marked_decode(batch: Any) -> Any:
        with record_function("decode"):
            return decode(batch)

    llm._ctx.decode = marked_decode

    def run_document() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(doc)
        llm.eval([unit[0]])  # the first token after the document
        if args.decodes:
            with record_function("steps"):
                for t in range(args.decodes):
                    llm.eval([unit[1 + t % (len(unit) - 1)]])
        return time.perf_counter() - t0

    run_document()  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for r in range(args.repeats):
            with record_function(f"run{r}"):
                run_document()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, "rb") as f:
            raw = f.read()
    if args.trace:
        with gzip.open(args.trace, "wb") as g:
            g.write(raw)
    return json.loads(raw)["traceEvents"]


def busy_shares(kernels: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """Each kernel with what it adds to the GPU's busy time, us: by start, the part of it that runs past all kernels
    before it. Under launch chains (programmatic dependent launch) a kernel starts before the one ahead of it ends and
    waits, so its duration counts that wait again; its share counts only the time by which it moves the end."""
    shares, end = [], float("-inf")
    for k in sorted(kernels, key=lambda k: k["ts"]):
        shares.append((k, max(0.0, k["ts"] + k["dur"] - max(k["ts"], end))))
        end = max(end, k["ts"] + k["dur"])
    return shares


def busy_ms(kernels: list[dict[str, Any]]) -> float:
    """Time covered by at least one kernel, ms."""
    return sum(share for _, share in busy_shares(kernels)) / 1e3


def top_kernels(kernels: list[dict[str, Any]], per: int, unit: str) -> None:
    """The 16 kernels of most total time, each as its time, its share of the busy time (busy_shares) and its launches,
    divided by ``per``."""
    total: collections.Counter[str] = collections.Counter()
    busy: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for k, share in busy_shares(kernels):
        name = k["name"].removeprefix("void ").split("<")[0].split("(")[0][:48]
        total[name] += k["dur"]
        busy[name] += share
        count[name] += 1
    scale = 1e3 if unit == "ms" else 1.0
    print(f"  {'time':>8} {'busy':>8} {'count':>6}")
    for name, us in total.most_common(16):
        print(f"  {us / scale / per:8.2f} {busy[name] / scale / per:8.2f} {count[name] / per:6g}  {name}")


def report(events: list[dict[str, Any]]) -> None:
    def marked(name: str) -> list[dict[str, Any]]:
        return sorted((e for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith(name)),
                      key=lambda e: e["ts"])

    kernels = [e for e in events if e.get("cat") == "kernel"]
    calls = sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")), key=lambda e: e["ts"])
    runs = marked("run")
    in_run = [[k for k in kernels if r["ts"] <= k["ts"] <= r["ts"] + r["dur"]] for r in runs]
    for r, ks in zip(runs, in_run):
        print(f"{r['name']}: wall {r['dur'] / 1e3:.1f} ms, kernels {len(ks)} summing {sum(k['dur'] for k in ks) / 1e3:.1f}"
              f" ms, GPU busy {busy_ms(ks):.1f} ms")
    r = runs[len(runs) // 2]  # the middle run, by kernel
    print(f"kernels of {r['name']} (ms):")
    top_kernels(in_run[len(runs) // 2], 1, "ms")
    steps = marked("steps")
    if steps:
        in_steps = [[k for k in kernels if s["ts"] <= k["ts"] <= s["ts"] + s["dur"]] for s in steps]
        step_starts = [[d["ts"] for d in marked("decode") if s["ts"] <= d["ts"] <= s["ts"] + s["dur"]] for s in steps]
        per_run = max(1, sum(map(len, step_starts)) // len(steps))
        # from one step's start to the next: robust to the odd step that captures a CUDA graph (a few ms)
        periods = [b - a for starts in step_starts for a, b in zip(starts, starts[1:])]
        print(f"single-token decodes, per step (median of {len(steps)} runs of {per_run}): wall "
              f"{statistics.median(s['dur'] for s in steps) / 1e3 / per_run:.3f} ms (median step "
              f"{statistics.median(periods) / 1e3 if periods else float('nan'):.3f} ms), kernels "
              f"{statistics.median(sum(k['dur'] for k in ks) for ks in in_steps) / 1e3 / per_run:.3f} ms, GPU busy "
              f"{statistics.median(busy_ms(ks) for ks in in_steps) / per_run:.3f} ms; kernels per step (us):")
        top_kernels([k for ks in in_steps for k in ks], per_run * len(steps), "us")
        api = collections.Counter(c["name"] for c in calls for s in steps if s["ts"] <= c["ts"] <= s["ts"] + s["dur"])
        print("  CUDA calls per step: " + ", ".join(f"{n} {c / (per_run * len(steps)):g}" for n, c in api.most_common(8)))
    starts = [c["ts"] for c in calls]
    before, after = [], []
    for d in marked("decode"):
        i = bisect.bisect_left(starts, d["ts"])
        if i < len(calls) and calls[i]["ts"] < d["ts"] + d["dur"]:
            before.append((calls[i]["ts"] - d["ts"]) / 1e3)
            after.append((d["ts"] + d["dur"] - calls[i]["ts"]) / 1e3)
    if before:
        print(f"per llama_decode (median of {len(before)}): {statistics.median(before):.2f} ms on the host before its "
              f"first CUDA call, {statistics.median(after):.2f} ms from there to its return")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ubatch", type=int, default=512, help="n_batch = n_ubatch")
    ap.add_argument("--ga-n", type=int, default=8)
    ap.add_argument("--ga-w", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decodes", type=int, default=0, help="single-token decodes after each document, reported apart")
    ap.add_argument("-ngl", "--n-gpu-layers", dest="ngl", type=int, default=99)
    add_swa_full(ap)
    ap.add_argument("--trace", help="also write the timeline here (gzipped chrome-trace JSON)")
    report(record(ap.parse_args()))


if __name__ == "__main__":
    main()
