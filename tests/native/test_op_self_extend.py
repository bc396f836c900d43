"""GGML_OP_FLASH_ATTN_EXT_SE on its own, in the manner of llama.cpp's test-backend-ops: every backend that has
the op against a float64 NumPy reference of its definition (ggml-self-extend.h), and against the CPU by NMSE.

The op selects per (query, key) between the pair (q, k) and the pair (q_g, k_g) from the positions; G enters
only through how q_g/k_g were rotated. Here q_g/k_g are independent random tensors, so a pair taken from the
wrong side, or a neighbour boundary off by one, moves the output by O(1): far above the tolerances, which are
the f16 rounding of K/V (2e-3 relative to the output scale), and q8_0's (3e-2).
The cases cover head sizes 64/128/256, GQA 1/2/4/8, W 1/7/512, 1/7/64/512 queries (decode, odd, prefill), f16 and
q8_0 K, empty cells, out-of-order positions, two streams and logit soft-capping.
"""

from __future__ import annotations

import ctypes
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from selfext_cpp._ggml import (
    GGML_PREC_F32, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_I32, GGML_TYPE_Q8_0, Ggml, InitParams, open_ggml)


@pytest.fixture(scope="module")
def ggml() -> Iterator[Ggml]:
    g = open_ggml(gpu=int(os.environ.get("SELFEXT_TEST_NGL", "0")) > 0)
    yield g
    g.close()


@dataclass(frozen=True)
class Case:
    D: int
    n_head_kv: int
    gqa: int
    W: int
    n_q: int
    n_kv: int
    type_k: int
    n_stream: int = 1
    softcap: float = 0.0

    def __str__(self) -> str:
        k = {GGML_TYPE_F16: "f16", GGML_TYPE_Q8_0: "q8_0"}[self.type_k]
        cap = f"-cap{self.softcap:g}" if self.softcap else ""
        return f"D{self.D}-gqa{self.gqa}-W{self.W}-q{self.n_q}-kv{self.n_kv}-{k}-s{self.n_stream}{cap}"


CASES = [Case(D, 2, gqa, W, n_q, n_kv, tk, ns)
         for D in (64, 128) for tk in (GGML_TYPE_F16, GGML_TYPE_Q8_0)
         for gqa, W, n_q, n_kv, ns in ((1, 1, 1, 700, 1), (4, 7, 7, 300, 1), (8, 512, 512, 900, 1),
                                       (4, 512, 1, 2048, 1), (8, 7, 1, 1500, 2), (1, 512, 64, 1000, 2))]
CASES += [Case(64, 2, 4, 7, n_q, 700, GGML_TYPE_F16, softcap=2.0) for n_q in (1, 64)]  # Gemma-2 style soft-capping
# head size 256 (Gemma 2/3; Gemma 3 270M: 4 query heads, 1 KV head): decode, odd, prefill, two streams, soft-capping
CASES += [Case(256, 1, 4, 512, 1, 2048, tk) for tk in (GGML_TYPE_F16, GGML_TYPE_Q8_0)]
CASES += [Case(256, 1, 4, 7, 7, 300, GGML_TYPE_F16), Case(256, 2, 2, 100, 512, 900, GGML_TYPE_F16),
          Case(256, 1, 4, 33, 64, 1000, GGML_TYPE_F16, 2), Case(256, 2, 2, 7, 64, 700, GGML_TYPE_F16, softcap=50.0)]


def make_inputs(c: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Shapes in NumPy order (reversed ggml ne). Cells: positions 0..n_kv-1 shuffled in blocks, 5 % empty."""
    H = c.n_head_kv * c.gqa
    x = {n: rng.standard_normal((c.n_stream, H, c.n_q, c.D)).astype(np.float32) for n in ("q", "q_g")}
    for n in ("k", "k_g", "v"):
        x[n] = rng.standard_normal((c.n_stream, c.n_head_kv, c.n_kv, c.D)).astype(np.float16).astype(np.float32)
    pos_k = np.stack([np.concatenate([b[::-1] for b in np.array_split(rng.permutation(c.n_kv), 7)])
                      for _ in range(c.n_stream)]).astype(np.int32)
    pos_q = (np.max(pos_k, axis=1, keepdims=True) - c.n_q + 1 + np.arange(c.n_q)).astype(np.int32)
    empty = rng.random((c.n_stream, c.n_kv)) < 0.05
    visible = (pos_k[:, None, :] <= pos_q[:, :, None]) & ~empty[:, None, :]  # [s, n_q, n_kv], causal
    n_q_pad = c.n_q + (-c.n_q) % 64
    mask = np.full((c.n_stream, n_q_pad, c.n_kv), -np.inf, dtype=np.float32)
    mask[:, :c.n_q][visible] = 0.0
    mask[:, :c.n_q] += np.where(visible, rng.uniform(-1, 0, visible.shape), 0.0)  # a real additive bias too
    x.update(pos_q=pos_q, pos_k=pos_k, mask=mask.astype(np.float16))
    return x


def reference(c: Case, x: dict[str, np.ndarray], scale: float) -> np.ndarray:
    """[n_stream, n_q, H, D], float64, straight from the definition."""
    H = c.n_head_kv * c.gqa
    out = np.zeros((c.n_stream, c.n_q, H, c.D))
    for s in range(c.n_stream):
        grouped = (x["pos_q"][s][:, None] - x["pos_k"][s][None, :]) >= c.W  # [n_q, n_kv]
        m = x["mask"][s, :c.n_q].astype(np.float64)
        for h in range(H):
            hk = h // c.gqa
            ln = x["q"][s, h].astype(np.float64) @ x["k"][s, hk].T.astype(np.float64)
            lg = x["q_g"][s, h].astype(np.float64) @ x["k_g"][s, hk].T.astype(np.float64)
            z = np.where(grouped, lg, ln) * scale
            if c.softcap:
                z = c.softcap * np.tanh(z / c.softcap)
            z = z + m
            z = np.exp(z - z.max(axis=1, keepdims=True))
            out[s, :, h] = (z / z.sum(axis=1, keepdims=True)) @ x["v"][s, hk].astype(np.float64)
    return out


def run_op(g: Ggml, backend: int, c: Case, x: dict[str, np.ndarray], scale: float,
           vanilla: bool = False, rope_mode: int | None = None, q_rot: bool = False,
           steps: tuple[int, int] | None = None, causal: bool = False) -> np.ndarray | None:
    """The op on one backend (``vanilla``: llama.cpp's ggml_flash_attn_ext on q, k, v, mask instead;
    ``rope_mode``: the rotation-table form, x["k_rot"] instead of x["k_g"]; ``steps`` = (G, n_lo) with it: the table
    of steps x["k_rot"], [n_rows, n_rot]; ``q_rot``: x["q_rot"] instead of x["q_g"]; ``causal``: no mask, the op
    masks by the positions, ggml_flash_attn_ext_se_causal); None when the backend does not support this case."""
    lib = g.lib
    ctx = lib.ggml_init(InitParams(64 * 1024 * 1024 // 64, None, True))
    H = c.n_head_kv * c.gqa

    def tensor(type_: int, *ne: int) -> int:
        return lib.ggml_new_tensor_4d(ctx, type_, *(list(ne) + [1] * (4 - len(ne))))

    n_q_pad = x["mask"].shape[1]
    t = {
        "q": tensor(GGML_TYPE_F32, c.D, c.n_q, H, c.n_stream), "q_g": tensor(GGML_TYPE_F32, c.D, c.n_q, H, c.n_stream),
        "k": tensor(c.type_k, c.D, c.n_kv, c.n_head_kv, c.n_stream),
        "k_g": tensor(GGML_TYPE_F16, c.D, c.n_kv, c.n_head_kv, c.n_stream),
        "v": tensor(GGML_TYPE_F16, c.D, c.n_kv, c.n_head_kv, c.n_stream),
        "mask": tensor(GGML_TYPE_F16, c.n_kv, n_q_pad, 1, c.n_stream),
        "pos_q": tensor(GGML_TYPE_I32, c.n_q, c.n_stream), "pos_k": tensor(GGML_TYPE_I32, c.n_kv, c.n_stream),
    }
    if rope_mode is not None:
        del t["k_g"]
        shape = x["k_rot"].shape
        t["k_rot"] = (tensor(GGML_TYPE_F32, shape[-1], shape[0]) if steps  # a table of steps: F32
                      else tensor(GGML_TYPE_F16, shape[-1], c.n_kv, 1, c.n_stream))  # of rows: F16
    if q_rot:
        del t["q_g"]
        t["q_rot"] = tensor(GGML_TYPE_F32, x["q_rot"].shape[-1], c.n_q, 1, c.n_stream)
    if causal:
        t["mask"] = None
    if steps:
        out = lib.ggml_flash_attn_ext_se_steps(ctx, t["q"], t["k"], t["v"], t["mask"], t["q_rot" if q_rot else "q_g"],
                                               t["k_rot"], rope_mode, *steps, t["pos_q"], t["pos_k"], c.W, scale,
                                               c.softcap)
        if q_rot:
            lib.ggml_flash_attn_ext_se_q_rot(out)
    elif rope_mode is not None:
        out = lib.ggml_flash_attn_ext_se_rot(ctx, t["q"], t["k"], t["v"], t["mask"], t["q_rot" if q_rot else "q_g"],
                                             t["k_rot"], rope_mode, t["pos_q"], t["pos_k"], c.W, scale, c.softcap)
        if q_rot:
            lib.ggml_flash_attn_ext_se_q_rot(out)
    elif vanilla:
        out = lib.ggml_flash_attn_ext(ctx, t["q"], t["k"], t["v"], t["mask"], scale, 0.0, c.softcap)
        lib.ggml_prec_set_acc(out, GGML_PREC_F32)
    else:
        out = lib.ggml_flash_attn_ext_se(ctx, t["q"], t["k"], t["v"], t["mask"], t["q_g"], t["k_g"], t["pos_q"],
                                         t["pos_k"], c.W, scale, c.softcap)
    if causal:
        lib.ggml_flash_attn_ext_se_causal(out)
    try:
        if not lib.ggml_backend_supports_op(backend, out):
            return None
        graph = lib.ggml_new_graph(ctx)
        lib.ggml_build_forward_expand(graph, out)
        buf = lib.ggml_backend_alloc_ctx_tensors(ctx, backend)
        try:
            for name, tensor_ in t.items():
                if tensor_ is None:
                    continue
                a = np.ascontiguousarray(x[name])
                if name == "k" and c.type_k == GGML_TYPE_Q8_0:
                    q8 = ctypes.create_string_buffer(lib.ggml_nbytes(tensor_))
                    f32 = np.ascontiguousarray(a, dtype=np.float32)
                    lib.ggml_quantize_chunk(GGML_TYPE_Q8_0, f32.ctypes.data, q8, 0, f32.size // c.D, c.D, None)
                    lib.ggml_backend_tensor_set(tensor_, q8, 0, lib.ggml_nbytes(tensor_))
                    continue
                if name in ("k", "k_g", "v", "mask"):
                    a = a.astype(np.float16)
                assert a.nbytes == lib.ggml_nbytes(tensor_), name
                lib.ggml_backend_tensor_set(tensor_, a.ctypes.data, 0, a.nbytes)
            assert lib.ggml_backend_graph_compute(backend, graph) == 0
            res = np.empty((c.n_stream, c.n_q, H, c.D), dtype=np.float32)
            lib.ggml_backend_tensor_get(out, res.ctypes.data, 0, res.nbytes)
            return res
        finally:
            lib.ggml_backend_buffer_free(buf)
    finally:
        lib.ggml_free(ctx)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_op_matches_reference_on_every_backend(ggml: Ggml, case: Case) -> None:
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    x = make_inputs(case, rng)
    scale = 1.0 / np.sqrt(case.D)
    want = reference(case, x, scale)
    tol = 3e-2 if case.type_k == GGML_TYPE_Q8_0 else 2e-3  # q8_0 K rounds every logit by ~1e-2
    results = {}
    for name, backend in ggml.backends.items():
        got = run_op(ggml, backend, case, x, scale)
        if got is None:
            assert name != "CPU", "the CPU backend runs every case"
            continue
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        assert err < tol, f"{name}: max error {err:.3g} (relative to the output scale) > {tol}"
        results[name] = got
    if "GPU" in results:  # test-backend-ops' measure: normalized mean squared error against the CPU
        nmse = float(np.sum((results["GPU"] - results["CPU"]) ** 2) / np.sum(results["CPU"] ** 2))
        assert nmse < 1e-5, f"GPU vs CPU NMSE {nmse:.3g}"


ROPE_NORM, ROPE_NEOX = 0, 2  # LLAMA_ROPE_TYPE_NORM / _NEOX (ggml's rope modes)
ROT_CASES = [(Case(64, 2, 4, 7, 7, 300, GGML_TYPE_F16), ROPE_NORM, 64),
             (Case(64, 2, 4, 7, 7, 300, GGML_TYPE_F16), ROPE_NEOX, 64),
             (Case(128, 2, 8, 512, 512, 900, GGML_TYPE_F16), ROPE_NEOX, 128),
             (Case(128, 2, 4, 512, 1, 2048, GGML_TYPE_F16), ROPE_NORM, 128),  # decode
             (Case(64, 2, 8, 7, 1, 1500, GGML_TYPE_F16, 2), ROPE_NEOX, 32),    # two streams, partial rotary
             (Case(256, 1, 4, 33, 64, 1000, GGML_TYPE_F16, 2), ROPE_NEOX, 256),
             (Case(64, 2, 4, 7, 64, 700, GGML_TYPE_F16, softcap=2.0), ROPE_NORM, 48),
             # pairs that do not fall on whole pieces of 8 dimensions (the CUDA scratch takes them one by one)
             (Case(64, 2, 4, 7, 64, 700, GGML_TYPE_F16), ROPE_NEOX, 24),
             (Case(128, 2, 2, 7, 7, 300, GGML_TYPE_F16), ROPE_NORM, 6)]
# decode with a table of the whole head: the CUDA kernel rotates K as it loads it (the cases above with n_rot < D, or
# more queries, go through its scratch of grouped keys)
ROT_CASES += [(Case(64, 2, 4, 7, 1, 700, GGML_TYPE_F16), ROPE_NEOX, 64),
              (Case(128, 2, 8, 100, 1, 1500, GGML_TYPE_F16, 2), ROPE_NEOX, 128),
              (Case(64, 2, 2, 7, 4, 700, GGML_TYPE_F16, softcap=2.0), ROPE_NORM, 64),
              (Case(256, 1, 4, 33, 1, 1000, GGML_TYPE_F16), ROPE_NEOX, 256),
              (Case(256, 1, 4, 7, 3, 700, GGML_TYPE_F16, softcap=50.0), ROPE_NORM, 256),
              # decode with pairs that do not fill whole vectors: the CPU kernel rotates a converted row first
              (Case(64, 2, 4, 7, 1, 700, GGML_TYPE_F16), ROPE_NEOX, 24),
              (Case(128, 2, 2, 7, 1, 300, GGML_TYPE_F16), ROPE_NORM, 6)]


def random_table(rng: np.random.Generator, shape: tuple[int, ...], n_rot: int, mode: int) -> np.ndarray:
    """A rotation table [*shape, n_rot] of random angles, one per pair: cos at the pair's first dimension, sin at its
    second (NORM pairs (2i, 2i + 1), NEOX (i, i + n_rot/2))."""
    angle = rng.uniform(-np.pi, np.pi, (*shape, n_rot // 2))
    table = np.empty((*shape, n_rot))
    pairs = np.arange(n_rot // 2)
    first, second = (2 * pairs, 2 * pairs + 1) if mode == ROPE_NORM else (pairs, pairs + n_rot // 2)
    table[..., first], table[..., second] = np.cos(angle), np.sin(angle)
    return table.astype(np.float32)


def rotated(k: np.ndarray, table: np.ndarray, mode: int) -> np.ndarray:
    """k [.., n_kv, D] rotated per key by the table [.., n_kv, n_rot] (cos at a pair's first dimension, sin at
    its second; NORM pairs (2i, 2i + 1), NEOX (i, i + n_rot/2)), as ggml-self-extend.h defines the table form."""
    n_rot = table.shape[-1]
    a = np.arange(n_rot // 2) * 2 if mode == ROPE_NORM else np.arange(n_rot // 2)
    b = a + 1 if mode == ROPE_NORM else a + n_rot // 2
    out = k.astype(np.float64).copy()
    c, s = table[..., a], table[..., b]
    out[..., a] = k[..., a] * c - k[..., b] * s
    out[..., b] = k[..., a] * s + k[..., b] * c
    return out


def with_query_rows(rng: np.random.Generator, case: Case, x: dict[str, np.ndarray], n_rot: int, mode: int) -> None:
    """x["q_rot"]: one random table row per query, for all its heads, and x["q_g"] the queries rotated by it."""
    x["q_rot"] = random_table(rng, (case.n_stream, 1, case.n_q), n_rot, mode)
    x["q_g"] = rotated(x["q"], x["q_rot"], mode)


def with_table(rng: np.random.Generator, case: Case, x: dict[str, np.ndarray], mode: int, n_rot: int) -> None:
    """x["k_rot"]: a random F16 table of rows (as libllama stores it), and x["k_g"] the keys rotated by it."""
    x["k_rot"] = random_table(rng, (case.n_stream, 1, case.n_kv), n_rot, mode).astype(np.float16)
    x["k_g"] = rotated(x["k"], x["k_rot"], mode)


def with_steps(rng: np.random.Generator, x: dict[str, np.ndarray], mode: int, n_rot: int, G: int,
               n_lo: int) -> np.ndarray:
    """x["k_rot"]: a random table of steps with exactly the rows the highest position needs, and x["k_g"] each key
    rotated by its two rows (an empty cell, at -1, by row 0); returns the steps back of each key, [n_stream, n_kv]."""
    m = np.where(x["pos_k"] >= 0, x["pos_k"] - x["pos_k"] // G, 0)
    steps = random_table(rng, (n_lo + int(np.max(m)) // n_lo + 1,), n_rot, mode)
    x["k_rot"] = steps
    x["k_g"] = rotated(rotated(x["k"], steps[m % n_lo][:, None], mode), steps[n_lo + m // n_lo][:, None], mode)
    return m


def assert_every_backend_matches(ggml: Ggml, case: Case, x: dict[str, np.ndarray], scale: float,
                                 want: np.ndarray, **form: Any) -> None:
    """run_op in the given form on every backend that has it (the CPU must) within 2e-3 of the output scale."""
    ran = []
    for name, backend in ggml.backends.items():
        got = run_op(ggml, backend, case, x, scale, **form)
        if got is None:
            assert name != "CPU", "the CPU backend runs every form"
            continue
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        assert err < 2e-3, f"{name}: max error {err:.3g} (relative to the output scale)"
        ran.append(name)
    assert "CPU" in ran


@pytest.mark.parametrize("q_rot", [False, True], ids=["q_g", "q_rot"])
@pytest.mark.parametrize("case,mode,n_rot", ROT_CASES, ids=[f"{c}-{'neox' if m else 'norm'}{r}" for c, m, r in ROT_CASES])
def test_rotation_table_form_matches_reference(ggml: Ggml, case: Case, mode: int, n_rot: int, q_rot: bool) -> None:
    """ggml_flash_attn_ext_se_rot: the grouped keys made in the kernel from K and a cos/sin table per key (F16) equal
    the keys form given those keys rotated in float64, on every backend that has this form (CPU, CUDA). With
    ggml_flash_attn_ext_se_q_rot the grouped queries are made from q and a table row per query the same way."""
    rng = np.random.default_rng(zlib.crc32(f"{case}-{mode}-{n_rot}-{q_rot}".encode()))
    x = make_inputs(case, rng)
    with_table(rng, case, x, mode, n_rot)
    if q_rot:
        with_query_rows(rng, case, x, n_rot, mode)
    scale = 1.0 / np.sqrt(case.D)
    want = reference(case, x, scale)
    assert_every_backend_matches(ggml, case, x, scale, want, rope_mode=mode, q_rot=q_rot)
    # the table matters: the same op with the unrotated keys as k_g is far off
    x_plain = dict(x, k_g=x["k"])
    assert np.max(np.abs(reference(case, x_plain, scale) - want)) / np.max(np.abs(want)) > 10 * 2e-3


STEP_CASES = [(Case(64, 2, 4, 7, 1, 700, GGML_TYPE_F16), ROPE_NORM, 64, 4, 16),  # decode: one query
              (Case(64, 2, 4, 7, 64, 700, GGML_TYPE_F16), ROPE_NEOX, 64, 3, 8),  # prefill: the keys rotated whole
              (Case(128, 2, 2, 100, 4, 1500, GGML_TYPE_F16, 2), ROPE_NEOX, 128, 8, 128),
              (Case(128, 2, 8, 512, 512, 900, GGML_TYPE_F16), ROPE_NORM, 96, 2, 32),
              (Case(64, 2, 8, 7, 1, 1500, GGML_TYPE_F16, 2), ROPE_NORM, 32, 1, 4),  # G 1: steps of 0
              (Case(256, 1, 4, 33, 1, 1000, GGML_TYPE_F16), ROPE_NEOX, 256, 16, 128),
              (Case(64, 2, 2, 7, 3, 700, GGML_TYPE_F16, softcap=2.0), ROPE_NORM, 64, 5, 2)]


@pytest.mark.parametrize("q_rot", [False, True], ids=["q_g", "q_rot"])
@pytest.mark.parametrize("case,mode,n_rot,G,n_lo", STEP_CASES,
                         ids=[f"{c}-{'neox' if m else 'norm'}{r}-G{g}-lo{lo}" for c, m, r, g, lo in STEP_CASES])
def test_table_of_steps_matches_reference(ggml: Ggml, case: Case, mode: int, n_rot: int, G: int, n_lo: int,
                                          q_rot: bool) -> None:
    """ggml_flash_attn_ext_se_steps: each key's row composed in the kernel from two rows of a table of steps (random
    angles here, so a wrong row or a wrong product is O(1) off) equals the keys form given the keys rotated by that
    product in float64. Positions are out of order (the larger step changes from key to key), some empty cells sit
    at -1, and the table has exactly the rows the highest position needs."""
    rng = np.random.default_rng(zlib.crc32(f"{case}-{mode}-{n_rot}-{G}-{n_lo}-{q_rot}".encode()))
    x = make_inputs(case, rng)
    x["pos_k"] = np.where(rng.random(x["pos_k"].shape) < 0.03, -1, x["pos_k"]).astype(np.int32)  # (masked anyway)
    m = with_steps(rng, x, mode, n_rot, G, n_lo)
    steps = x["k_rot"]
    if q_rot:
        with_query_rows(rng, case, x, n_rot, mode)
    scale = 1.0 / np.sqrt(case.D)
    want = reference(case, x, scale)
    assert_every_backend_matches(ggml, case, x, scale, want, rope_mode=mode, q_rot=q_rot, steps=(G, n_lo))
    # both steps matter: the keys rotated by the single-position step alone are far off
    x_lo = dict(x, k_g=rotated(x["k"], steps[m % n_lo][:, None], mode))
    assert np.max(np.abs(reference(case, x_lo, scale) - want)) / np.max(np.abs(want)) > 10 * 2e-3


def causal_inputs(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """make_inputs with the mask that ggml_flash_attn_ext_se_causal derives from the positions instead: the queries a
    fifth of the cells before the end (keys after a query lie in many tiles, for a decode too), 5 % empty cells at
    position -1, a key visible when 0 <= pos_k <= pos_q, no additive bias."""
    x = make_inputs(case, rng)
    x["pos_q"] = (x["pos_q"] - case.n_kv // 5).astype(np.int32)
    x["pos_k"] = np.where(rng.random(x["pos_k"].shape) < 0.05, -1, x["pos_k"]).astype(np.int32)
    visible = (x["pos_k"][:, None, :] >= 0) & (x["pos_k"][:, None, :] <= x["pos_q"][:, :, None])  # [s, n_q, n_kv]
    mask = np.full(x["mask"].shape, -np.inf, dtype=np.float32)
    mask[:, :case.n_q][visible] = 0.0
    x["mask"] = mask.astype(np.float16)
    return x


# (case, form): decode, odd and prefill query counts, heads of 64/128/256, two streams, a q8_0 K, soft-capping
CAUSAL_CASES = [(Case(64, 2, 1, 1, 1, 700, GGML_TYPE_F16), "keys"), (Case(64, 2, 4, 7, 7, 300, GGML_TYPE_F16), "keys"),
                (Case(128, 2, 8, 512, 512, 900, GGML_TYPE_F16), "keys"),
                (Case(128, 2, 8, 7, 1, 1500, GGML_TYPE_F16, 2), "keys"),
                (Case(128, 2, 1, 512, 64, 1000, GGML_TYPE_Q8_0, 2), "keys"),
                (Case(64, 2, 4, 7, 64, 700, GGML_TYPE_F16, softcap=2.0), "keys"),
                (Case(256, 1, 4, 512, 1, 2048, GGML_TYPE_F16), "keys"), (Case(256, 2, 2, 100, 512, 900, GGML_TYPE_F16), "keys"),
                (Case(128, 2, 4, 512, 1, 2048, GGML_TYPE_F16), "table"),
                (Case(128, 2, 8, 512, 512, 900, GGML_TYPE_F16), "table"),
                (Case(256, 1, 4, 33, 1, 1000, GGML_TYPE_F16, 2), "table"),
                (Case(64, 2, 4, 7, 1, 700, GGML_TYPE_F16), "steps"),
                (Case(128, 2, 2, 100, 4, 1500, GGML_TYPE_F16, 2), "steps"),
                (Case(256, 1, 4, 33, 1, 1000, GGML_TYPE_F16), "steps")]


@pytest.mark.parametrize("case,form", CAUSAL_CASES, ids=[f"{c}-{f}" for c, f in CAUSAL_CASES])
def test_causal_by_positions_matches_reference(ggml: Ggml, case: Case, form: str) -> None:
    """ggml_flash_attn_ext_se_causal: without a mask, the op hides the keys after each query and the empty cells
    (pos_k -1) by the positions, in every form of the grouped keys, on every backend that has the op: as the
    reference with that mask. Each query here has keys after it among the cells, so a tile that is neither all
    visible nor all hidden is in every case."""
    rng = np.random.default_rng(zlib.crc32(f"{case}-{form}-causal".encode()))
    x = causal_inputs(case, rng)
    form_args: dict[str, Any] = {}
    if form == "table":
        with_table(rng, case, x, ROPE_NEOX, case.D)
        with_query_rows(rng, case, x, case.D, ROPE_NEOX)
        form_args = dict(rope_mode=ROPE_NEOX, q_rot=True)
    elif form == "steps":
        with_steps(rng, x, ROPE_NORM, case.D, 4, 16)
        form_args = dict(rope_mode=ROPE_NORM, steps=(4, 16))
    scale = 1.0 / np.sqrt(case.D)
    want = reference(case, x, scale)
    tol = 3e-2 if case.type_k == GGML_TYPE_Q8_0 else 2e-3
    ran = []
    for name, backend in ggml.backends.items():
        got = run_op(ggml, backend, case, x, scale, causal=True, **form_args)
        if got is None:
            assert name != "CPU", "the CPU backend runs every form"
            continue
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        assert err < tol, f"{name}: max error {err:.3g} (relative to the output scale) > {tol}"
        ran.append(name)
    assert "CPU" in ran
    # the rule matters: the keys after the queries visible too are far off
    acausal = dict(x, mask=np.where(x["pos_k"][:, None, :] >= 0, 0.0, -np.inf) + np.zeros(x["mask"].shape))
    assert np.max(np.abs(reference(case, acausal, scale) - want)) / np.max(np.abs(want)) > 10 * tol


def test_wrong_side_is_detected(ggml: Ggml) -> None:
    """The comparison is sensitive to the rule: moving W by one (one key per query changes sides, out of ~300)
    moves the output by more than ten times the f16 tolerance."""
    case = Case(64, 2, 4, 7, 7, 300, GGML_TYPE_F16)
    x = make_inputs(case, np.random.default_rng(1))
    got = run_op(ggml, ggml.backends["CPU"], case, x, 0.125)
    other = reference(Case(64, 2, 4, 8, 7, 300, GGML_TYPE_F16), x, 0.125)
    assert got is not None
    assert np.max(np.abs(got - other)) / np.max(np.abs(other)) > 10 * 2e-3


# KV views of 256 cells, as llama.cpp pads them for flash attention
NEIGHBOUR_ONLY = [Case(64, 2, 4, 10**6, 7, 512, GGML_TYPE_F16), Case(128, 2, 1, 10**6, 64, 1024, GGML_TYPE_F16, 2),
                  Case(128, 2, 8, 10**6, 1, 2048, GGML_TYPE_F16), Case(256, 1, 4, 10**6, 512, 1024, GGML_TYPE_F16),
                  Case(256, 1, 4, 10**6, 1, 2048, GGML_TYPE_F16)]


@pytest.mark.parametrize("case", NEIGHBOUR_ONLY, ids=str)
def test_all_neighbour_is_llama_cpp_flash_attention(ggml: Ggml, case: Case) -> None:
    """With W past every distance the op is vanilla attention: on every backend it matches llama.cpp's own
    ggml_flash_attn_ext on the same inputs (q_g/k_g are then never read). Tolerance 1e-2 of the output scale:
    llama.cpp's CPU kernel accumulates P·V in f16 for f16 V on small batches (measured 5e-3 against the float64
    reference where the fused op is at 5e-7); a wrong side or a dropped key moves the output by O(1)."""
    x = make_inputs(case, np.random.default_rng(zlib.crc32(str(case).encode())))
    scale = 1.0 / np.sqrt(case.D)
    for name, backend in ggml.backends.items():
        want = run_op(ggml, backend, case, x, scale, vanilla=True)
        got = run_op(ggml, backend, case, x, scale)
        assert got is not None, name
        if want is None:
            assert name != "CPU", "the CPU backend runs every case"
            continue
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        assert err < 1e-2, f"{name}: max difference {err:.3g} (relative to the output scale)"
