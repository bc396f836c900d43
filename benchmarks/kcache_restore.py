#!/usr/bin/env python3
"""What one sequence's restore or K-shift costs the others: the prefix-reuse pattern of llama-server's slots.

    python benchmarks/kcache_restore.py [MODEL] --seqs 4 --tokens 2048 [--kv-unified]
    SELFEXT_LIB_PATH=/path/to/other/build/lib python benchmarks/kcache_restore.py ...   # another libllama

N sequences of --tokens tokens share one context (Self-Extend on, flash attention: the fused path with its
grouped keys, a rotation table or a second K cache as LLAMA_SELF_EXTEND_KEYS and the devices choose). Then, --reps times each, timed: (a) one token of sequence 0, then one decode step of one
token in every other sequence (the baseline); (b) sequence 0's saved state loaded back (llama-server's RAM
prompt cache), then (a); (c) sequence 0 shifted by one position (llama_memory_seq_add, as --cache-reuse and
context shift do), then (a). Printed: median milliseconds. When the grouped keys go stale per stream or for
the whole cache, (b) and (c) include rebuilding the other sequences' keys; per cell, only sequence 0's.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "native"))

from tinymodel import LlamaRunner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ga-n", type=int, default=4)
    ap.add_argument("--ga-w", type=int, default=512)
    ap.add_argument("--kv-unified", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()

    model = a.model
    if model is None:
        from selfext_cpp.hub import resolve_model

        model = str(resolve_model(None, progress=False))
    n_ctx = a.seqs * (a.tokens + 64)
    r = LlamaRunner(model, n_ctx=n_ctx, n_batch=512, n_seq_max=a.seqs, flash_attn=True, type_k=1, type_v=1,
                    kv_unified=a.kv_unified, n_threads=a.threads)
    assert r.set_self_extend(a.ga_n, a.ga_w) == 0 and r.fused
    rng = __import__("random").Random(0)
    for s in range(a.seqs):
        r.decode([rng.randrange(100, 40000) for _ in range(a.tokens)], seq_id=s)
    ll = r._ll
    size = ll.llama_state_seq_get_size(r.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert ll.llama_state_seq_get_data(r.ctx, buf, size, 0) == size

    others = list(range(1, a.seqs))

    def step() -> None:
        r.decode_batch([1000] * len(others), [r.seq_pos_max(s) + 1 for s in others], others)

    def own_token() -> None:  # one token of sequence 0: applies a pending K-shift, rebuilds what is stale
        r.decode_batch([1000], [r.seq_pos_max(0) + 1], [0])

    def restore() -> None:
        assert r.seq_rm(0)
        assert ll.llama_state_seq_set_data(r.ctx, buf, size, 0) == size

    def timed(*fns) -> float:
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t0) * 1e3

    times: dict[str, list[float]] = {"token + step": [], "restore + token + step": [],
                                     "shift + token + step": []}
    for _ in range(a.reps):
        times["token + step"].append(timed(own_token, step))
        times["restore + token + step"].append(timed(restore, own_token, step))
        times["shift + token + step"].append(timed(lambda: r.seq_add(0, 0, -1, 1), own_token, step))
    r.close()
    kv = "unified KV" if a.kv_unified else "one stream per sequence"
    print(f"{Path(model).name}: {a.seqs} sequences x {a.tokens} tokens, G={a.ga_n} W={a.ga_w}, {kv}; "
          f"one decode step of the {len(others)} other sequences, median of {a.reps} [ms]:")
    for k, v in times.items():
        print(f"  {k:14s} {statistics.median(v):9.1f}")


if __name__ == "__main__":
    main()
