"""The fused Self-Extend attention op against llama.cpp's flash attention, op against op, on one backend.

Both ops get the inputs llama.cpp's graph gives them: F32 queries, an f16 K/V cache viewed per KV head
([D, n_head_kv, n_kv] cells permuted), a causal f16 mask; Self-Extend also gets grouped queries and positions
(query i at n_kv - n_q + i, key j at j, window W) and its grouped keys in one of the op's forms (`--form`):
`cache` (a second K cache, ggml_flash_attn_ext_se), `table` (a rotation row per key, ggml_flash_attn_ext_se_rot)
or `steps` (a table of steps for G = `--ga-n`, ggml_flash_attn_ext_se_steps); a backend without a form skips it.
Per shape vanilla and each form run interleaved, `--repeats` times each; prints median milliseconds, the attention
TFLOP/s (4·D per visible query/key pair and head) and Self-Extend / vanilla as a speed ratio. On a CPU one op's
operands stay in its caches from run to run (12.8 MB for SmolLM2's heads at 16K), so this times its arithmetic; a
model's layers find them in memory, which `decode_depth.py` measures.

    python benchmarks/op_speed.py                     # GPU if the build has one, else CPU; 1.1B, 8B and Gemma 3 270M shapes
    python benchmarks/op_speed.py --cpu -t 2 --shape 64:9:3 --n-q 1 --depth 16384 --form steps,table,cache
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from selfext_cpp._ggml import (
    GGML_PREC_F32, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_I32, Ggml, InitParams, open_ggml)

SHAPES = {"1.1b": (128, 16, 4), "8b": (128, 32, 8), "gemma3-270m": (256, 4, 1)}  # head size, query heads, KV heads
FORMS = ("cache", "table", "steps")
ROPE_NEOX = 2  # GGML_ROPE_TYPE_NEOX: pairs (i, i + D/2)
N_LO = 128     # the table of steps' single-position rows, as libllama sizes it


def rotation_rows(rng: np.random.Generator, n: int, D: int) -> np.ndarray:
    """n rows of a NEOX rotation table over all D dimensions (cos of a pair at i, sin at i + D/2), random angles."""
    angle = rng.uniform(-np.pi, np.pi, (n, D // 2))
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)


def build(g: Ggml, backend: int, D: int, H: int, Hkv: int, n_q: int, n_kv: int, W: int, G: int,
          forms: list[str], rng: np.random.Generator) -> tuple[list[str], list[int], int, int, list[int]]:
    """Vanilla and the forms the backend has over the same tensors, allocated on ``backend`` and filled; returns
    (names, graphs, ctx, buffer, ops)."""
    lib = g.lib
    ctx = lib.ggml_init(InitParams(1 << 20, None, True))

    def tensor(type_: int, *ne: int) -> int:
        return lib.ggml_new_tensor_4d(ctx, type_, *(list(ne) + [1] * (4 - len(ne))))

    n_hi = (n_kv - n_kv // G) // N_LO + 1  # the larger steps that the highest position needs
    data = {  # name -> (tensor, array in NumPy order)
        "q": (tensor(GGML_TYPE_F32, D, n_q, H), rng.standard_normal((H, n_q, D), dtype=np.float32)),
        "q_g": (tensor(GGML_TYPE_F32, D, n_q, H), rng.standard_normal((H, n_q, D), dtype=np.float32)),
        "pos_q": (tensor(GGML_TYPE_I32, n_q), np.arange(n_kv - n_q, n_kv, dtype=np.int32)),
        "pos_k": (tensor(GGML_TYPE_I32, n_kv), np.arange(n_kv, dtype=np.int32)),
        "k_rot": (tensor(GGML_TYPE_F16, D, n_kv), rotation_rows(rng, n_kv, D).astype(np.float16)),
        "k_steps": (tensor(GGML_TYPE_F32, D, N_LO + n_hi), rotation_rows(rng, N_LO + n_hi, D)),
    }
    for name in ("k", "k_g", "v"):  # cells of the cache: [n_kv][Hkv][D]
        data[name] = (tensor(GGML_TYPE_F16, D, Hkv, n_kv), rng.standard_normal((n_kv, Hkv, D)).astype(np.float16))
    visible = np.arange(n_kv)[None, :] <= np.arange(n_kv - n_q, n_kv)[:, None]
    data["mask"] = (tensor(GGML_TYPE_F16, n_kv, n_q), np.where(visible, 0.0, -np.inf).astype(np.float16))

    k, k_g, v = (lib.ggml_permute(ctx, data[n][0], 0, 2, 1, 3) for n in ("k", "k_g", "v"))  # [D, n_kv, Hkv]
    q, q_g, mask, pos_q, pos_k = (data[n][0] for n in ("q", "q_g", "mask", "pos_q", "pos_k"))
    scale = 1.0 / np.sqrt(D)
    vanilla = lib.ggml_flash_attn_ext(ctx, q, k, v, mask, scale, 0.0, 0.0)
    lib.ggml_prec_set_acc(vanilla, GGML_PREC_F32)
    make = {
        "cache": lambda: lib.ggml_flash_attn_ext_se(ctx, q, k, v, mask, q_g, k_g, pos_q, pos_k, W, scale, 0.0),
        "table": lambda: lib.ggml_flash_attn_ext_se_rot(ctx, q, k, v, mask, q_g, data["k_rot"][0], ROPE_NEOX,
                                                        pos_q, pos_k, W, scale, 0.0),
        "steps": lambda: lib.ggml_flash_attn_ext_se_steps(ctx, q, k, v, mask, q_g, data["k_steps"][0], ROPE_NEOX,
                                                          G, N_LO, pos_q, pos_k, W, scale, 0.0),
    }
    if not lib.ggml_backend_supports_op(backend, vanilla):
        raise SystemExit(f"{lib.ggml_backend_name(backend).decode()} does not run this case")
    names, ops = ["vanilla"], [vanilla]
    for form in forms:
        op = make[form]()
        if lib.ggml_backend_supports_op(backend, op):
            names.append(form)
            ops.append(op)
        else:
            print(f"{lib.ggml_backend_name(backend).decode()} lacks the {form} form", file=sys.stderr)
    graphs = []
    for op in ops:
        graph = lib.ggml_new_graph(ctx)
        lib.ggml_build_forward_expand(graph, op)
        graphs.append(graph)
    buf = lib.ggml_backend_alloc_ctx_tensors(ctx, backend)
    for t, a in data.values():
        a = np.ascontiguousarray(a)
        lib.ggml_backend_tensor_set(t, a.ctypes.data, 0, a.nbytes)
    return names, graphs, ctx, buf, ops


def measure(g: Ggml, backend: int, D: int, H: int, Hkv: int, n_q: int, n_kv: int, W: int, G: int,
            forms: list[str], repeats: int) -> list[dict]:
    """One row per form: its median and vanilla's, TFLOP/s of both, and the speed ratio."""
    names, graphs, ctx, buf, ops = build(g, backend, D, H, Hkv, n_q, n_kv, W, G, forms, np.random.default_rng(0))
    lib = g.lib
    try:
        times: list[list[float]] = [[] for _ in graphs]
        for rep in range(repeats + 1):  # the first round warms up (kernel selection, pools)
            for i, graph in enumerate(graphs):
                t0 = time.perf_counter()
                assert lib.ggml_backend_graph_compute(backend, graph) == 0
                if rep:
                    times[i].append(time.perf_counter() - t0)
        for op in ops:
            out = np.empty(n_q * H * D, dtype=np.float32)
            lib.ggml_backend_tensor_get(op, out.ctypes.data, 0, out.nbytes)
            assert np.isfinite(out).all()
    finally:
        lib.ggml_backend_buffer_free(buf)
        lib.ggml_free(ctx)
    ms = [1e3 * statistics.median(t) for t in times]
    pairs = n_q * (n_kv - n_q) + n_q * (n_q + 1) // 2  # visible (query, key) pairs of the causal mask
    flop = 4.0 * D * H * pairs
    return [{"form": name, "D": D, "n_head": H, "n_head_kv": Hkv, "n_q": n_q, "n_kv": n_kv, "W": W,
             "vanilla_ms": round(ms[0], 3), "selfext_ms": round(m, 3),
             "vanilla_tflops": round(flop / ms[0] / 1e9, 2), "selfext_tflops": round(flop / m / 1e9, 2),
             "ratio": round(ms[0] / m, 3)} for name, m in zip(names[1:], ms[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", help="1.1b, 8b, gemma3-270m or D:n_head:n_head_kv (default: all three)")
    ap.add_argument("--n-q", type=int, action="append",
                    help="queries per op (default: 512, llama.cpp's default ubatch, 2048 and 1)")
    ap.add_argument("--depth", type=int, action="append", help="keys before the queries (default: 8192, 32768)")
    ap.add_argument("--ga-w", type=int, default=1024, help="neighbour window W (default: 1024)")
    ap.add_argument("--ga-n", type=int, default=8, help="group size G of the steps form (default: 8)")
    ap.add_argument("--form", default="cache", help=f"comma-separated forms of the grouped keys: {', '.join(FORMS)} "
                                                     "(default: cache)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cpu", action="store_true", help="the CPU backend even if there is a GPU")
    ap.add_argument("-t", "--threads", type=int, help="CPU threads (default: ggml's)")
    args = ap.parse_args()
    forms = args.form.split(",")
    if not set(forms) <= set(FORMS):
        ap.error(f"--form takes {', '.join(FORMS)}")

    g = open_ggml(gpu=not args.cpu, n_threads=args.threads)
    backend = g.backends.get("GPU", g.backends["CPU"])
    print(f"backend: {g.lib.ggml_backend_name(backend).decode()}", file=sys.stderr)
    print(f"{'form':>5} {'D':>4} {'H':>3} {'Hkv':>3} {'n_q':>5} {'n_kv':>6} {'vanilla ms':>10} {'selfext ms':>10} "
          f"{'TFLOP/s':>13} {'ratio':>6}")
    try:
        for shape in args.shape or list(SHAPES):
            D, H, Hkv = SHAPES[shape] if shape in SHAPES else map(int, shape.split(":"))
            for n_q in args.n_q or [512, 2048, 1]:
                for depth in args.depth or [8192, 32768]:
                    n_kv = -(-(depth + n_q) // 256) * 256  # llama.cpp pads the KV view to 256 cells
                    for r in measure(g, backend, D, H, Hkv, n_q, n_kv, args.ga_w, args.ga_n, forms, args.repeats):
                        print(f"{r['form']:>5} {D:>4} {H:>3} {Hkv:>3} {n_q:>5} {n_kv:>6} {r['vanilla_ms']:>10.3f} "
                              f"{r['selfext_ms']:>10.3f} {r['vanilla_tflops']:>6.2f}/{r['selfext_tflops']:<6.2f} "
                              f"{r['ratio']:>6.3f}", flush=True)
    finally:
        g.close()


if __name__ == "__main__":
    main()
