"""Gemma 3 (sliding-window layers interleaved with global ones) under Self-Extend equals the float64 reference.

Self-Extend applies to the global layers only: a sliding-window layer's query never sees a key n_swa or more
positions back, and its window fits the trained context, so it stays vanilla. The tiny models have n_swa = 16,
W down to 4 (so a local layer *would* group keys if Self-Extend reached it), RoPE bases 1e4 (global) and 1e2 (local),
100 tokens against 64 trained, and either the full-size SWA cache or one of about the window (cells reused as the
window slides).

Tolerances, on logits up to ~12. Generic path with an f32 cache: float32 arithmetic against float64 (~1e-6), plus
ggml's CPU GELU, which looks its result up in an f16 table indexed by the input rounded to f16. The reference does the
same, but an input within float32 rounding of an f16 boundary lands on the other entry, one f16 step (1e-3 relative)
away, and that propagates: ATOL = 2e-3 (observed 3.7e-4 to 6.8e-4 over the cases here). Fused path: the
sliding-window layers run llama.cpp's own flash attention, which rounds an f32 cache to f16 on the CPU: ATOL_FA = 1e-2
(observed 1.7e-3 to 2.2e-3), as for vanilla in test_self_extend.py. The mistakes these tests exist to catch move logits
by 1.7 to 3.9, and each test shows it: Self-Extend applied to the local layers too, the local RoPE base on a global
layer, or no sliding window at all are more than 10x ATOL_FA away.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from tinygemma import TinyGemma, gemma_reference_logits, make_tiny_gemma3
from tinymodel import GGML_TYPE_F16, GGML_TYPE_F32, GPU_ATOL, ON_GPU, LlamaRunner

ATOL = GPU_ATOL if ON_GPU else 2e-3
ATOL_FA = max(1e-2, GPU_ATOL)
N_TOKENS = 100


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> TinyGemma:
    return make_tiny_gemma3(tmp_path_factory.mktemp("gguf") / "gemma3.gguf", seed=3)


@pytest.fixture(scope="module")
def gemma256(tmp_path_factory: pytest.TempPathFactory) -> TinyGemma:
    """Gemma 3 270M's attention shape: 4 query heads, one KV head of 256, local-local-global."""
    path = tmp_path_factory.mktemp("gguf") / "gemma3-d256.gguf"
    return make_tiny_gemma3(path, swa=(True, True, False), n_embd=128, head_dim=256, seed=4)


def tokens_for(model: TinyGemma, n: int = N_TOKENS, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, model.vocab_size, n).tolist()


def max_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)))


def run(model: TinyGemma, tokens: list[int], ga_n: int, ga_w: int, *, fused: bool, swa_full: bool = True,
        chunk: int | None = None, type_k: int = GGML_TYPE_F32, **kw: object) -> np.ndarray:
    """Logits of ``tokens`` under Self-Extend; ``fused``: flash attention on, so the global layers run the fused op
    (on a GPU build where the CUDA kernel takes the case: f16 cache, head size 64/128/256)."""
    with LlamaRunner(model.path, n_ctx=256, flash_attn=fused, swa_full=swa_full, type_k=type_k, **kw) as r:
        assert r.set_self_extend(ga_n, ga_w) == 0
        kernel_takes_it = not ON_GPU or (type_k == GGML_TYPE_F16 and model.head_dim in (64, 128, 256))
        assert r.fused == (fused and ga_n > 1 and kernel_takes_it)
        return r.decode(tokens, chunk=chunk)


def test_reference_is_vanilla_llama_cpp(gemma: TinyGemma) -> None:
    """The reference's Gemma 3 (windows, per-layer RoPE bases, norms, GELU, tied output) is llama.cpp's."""
    tokens = tokens_for(gemma)
    want = gemma_reference_logits(gemma, tokens)
    for swa_full in (True, False):
        err = max_err(run(gemma, tokens, 1, 0, fused=False, swa_full=swa_full), want)
        assert err <= ATOL, f"swa_full={swa_full}: {err:.3g}"
    # the window matters: without it the reference is far off
    wide = gemma_reference_logits(dataclasses.replace(gemma, n_swa=10**6), tokens)
    assert max_err(wide, want) > 10 * ATOL_FA


@pytest.mark.parametrize("path", ["generic", "fused-steps", "fused-table", "fused-cache"])  # the forms of the grouped keys
@pytest.mark.parametrize(("ga_n", "ga_w", "swa_full"), [(2, 4, True), (4, 8, False), (3, 33, False)],
                         ids=["G2-W4-swa-full", "G4-W8-swa-window", "G3-W33-swa-window"])
def test_self_extend_on_global_layers_matches_reference(gemma: TinyGemma, path: str, swa_full: bool, ga_n: int,
                                                        ga_w: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if path != "generic":  # the cache's grouped keys are a second RoPE of k_norm's output
        monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", path.removeprefix("fused-"))
    tokens = tokens_for(gemma, seed=1)
    got = run(gemma, tokens, ga_n, ga_w, fused=path != "generic", swa_full=swa_full)
    want = gemma_reference_logits(gemma, tokens, ga_n=ga_n, ga_w=ga_w)
    atol = ATOL_FA if path != "generic" else ATOL
    assert max_err(got, want) <= atol
    # Self-Extend itself moves the logits far more than the tolerance
    assert max_err(gemma_reference_logits(gemma, tokens), want) > 10 * ATOL_FA


@pytest.mark.parametrize("path", ["generic", "fused"])
def test_sliding_window_layers_are_untouched(gemma: TinyGemma, path: str) -> None:
    """With W = 4 < n_swa = 16 a local layer would group the keys 4..15 back if Self-Extend reached it: it does not.
    And a global layer rotates with the global RoPE base, not the local one."""
    tokens = tokens_for(gemma, seed=2)
    got = run(gemma, tokens, 4, 4, fused=path == "fused")
    want = gemma_reference_logits(gemma, tokens, ga_n=4, ga_w=4)
    assert max_err(got, want) <= (ATOL_FA if path == "fused" else ATOL)
    local_too = gemma_reference_logits(gemma, tokens, ga_n=4, ga_w=4, self_extend_local=True)
    assert max_err(got, local_too) > 10 * ATOL_FA
    one_base = gemma_reference_logits(dataclasses.replace(gemma, rope_theta=gemma.rope_theta_swa), tokens,
                                      ga_n=4, ga_w=4)
    assert max_err(got, one_base) > 10 * ATOL_FA


@pytest.mark.parametrize("path", ["generic", "fused"])
def test_a_model_of_sliding_window_layers_only_stays_vanilla(tmp_path: Path, path: str) -> None:
    """No global layer: Self-Extend has nothing to do, and the graph is vanilla llama.cpp's, bit for bit."""
    model = make_tiny_gemma3(tmp_path / "local-only.gguf", swa=(True, True), seed=5)
    tokens = tokens_for(model, seed=3)
    kw = dict(n_ctx=256, flash_attn=path == "fused", swa_full=False)
    with LlamaRunner(model.path, **kw) as r:
        vanilla = r.decode(tokens)
    with LlamaRunner(model.path, **kw) as r:
        assert r.set_self_extend(4, 4) == 0
        np.testing.assert_array_equal(r.decode(tokens), vanilla)


@pytest.mark.parametrize("path", ["generic", "fused"])
@pytest.mark.parametrize("chunk", [1, 7])
def test_small_ubatches_over_a_sliding_window_cache(gemma: TinyGemma, path: str, chunk: int) -> None:
    """Token by token and in ubatches of 7: the local layers' cache of about n_swa cells is reused as the window
    slides, while the global layers read their whole cache and the grouped keys grow with it."""
    tokens = tokens_for(gemma, 80, seed=4)
    got = run(gemma, tokens, 4, 8, fused=path == "fused", swa_full=False, chunk=chunk, n_batch=chunk)
    want = gemma_reference_logits(gemma, tokens, ga_n=4, ga_w=8)
    assert max_err(got, want) <= (ATOL_FA if path == "fused" else ATOL)


@pytest.mark.parametrize("path", ["generic", "fused"])
def test_head_size_256(gemma256: TinyGemma, path: str) -> None:
    """Gemma 3 270M's head size on both paths; with an f16 cache on a GPU build the fused op runs on the GPU."""
    tokens = tokens_for(gemma256, seed=5)
    want = gemma_reference_logits(gemma256, tokens, ga_n=4, ga_w=8)
    got = run(gemma256, tokens, 4, 8, fused=path == "fused", swa_full=False)
    assert max_err(got, want) <= (ATOL_FA if path == "fused" else ATOL)
    f16 = run(gemma256, tokens, 4, 8, fused=path == "fused", swa_full=False, type_k=GGML_TYPE_F16,
              type_v=GGML_TYPE_F16)
    assert max_err(f16, want) <= ATOL_FA  # f16 rounding of every cached key and value
