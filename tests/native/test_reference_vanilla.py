"""The float64 NumPy reference equals vanilla llama.cpp, and its Self-Extend reduces to vanilla where it must.

Tolerance: with f32 weights, f32 K/V cache and no flash attention, llama.cpp computes the same maths in
float32; logits are O(1.5) and every dot product is <= 128 long, so float32 rounding gives ~1e-6 (observed
max 1.4e-6). ATOL = 1e-5 leaves 7x headroom and still catches real mistakes: changing rope_theta from
10000 to 10001 moves logits by 1e-4, the wrong RoPE pairing (NEOX vs NORM) by ~2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tinymodel import (
    GPU_ATOL,
    ON_GPU,
    GGML_TYPE_F16,
    LlamaRunner,
    RunnerFactory,
    TinyModel,
    make_tiny_gguf,
    reference_logits,
    rope,
    self_extend_attention,
)

ATOL = GPU_ATOL if ON_GPU else 1e-5  # f32 llama.cpp vs float64 reference, see module docstring
ATOL_F16 = 1e-2  # f16 K/V rounding (rel 5e-4 per element) gives ~1.2e-3 without FA, ~2.7e-3 with FA





def random_tokens(model: TinyModel, n: int, seed: int = 0) -> list[int]:
    """n ids drawn from the non-control tokens."""
    return np.random.default_rng(seed).integers(3, model.vocab_size, n).tolist()


# --- pure NumPy: Self-Extend degenerates to vanilla --------------------------------------------


@pytest.mark.parametrize("ga_w", [0, 1, 5, 1000])
def test_group_size_one_is_vanilla_for_any_window(model: TinyModel, ga_w: int) -> None:
    tokens = random_tokens(model, 24)
    vanilla = reference_logits(model, tokens)
    np.testing.assert_array_equal(reference_logits(model, tokens, ga_n=1, ga_w=ga_w), vanilla)


@pytest.mark.parametrize("ga_n", [2, 3, 4])
@pytest.mark.parametrize("extra", [0, 7])
def test_window_covering_all_tokens_is_vanilla(model: TinyModel, ga_n: int, extra: int) -> None:
    tokens = random_tokens(model, 24)
    vanilla = reference_logits(model, tokens)
    np.testing.assert_array_equal(reference_logits(model, tokens, ga_n=ga_n, ga_w=24 + extra), vanilla)


def test_self_extend_beyond_window_changes_logits_far_above_tolerance(model: TinyModel) -> None:
    tokens = random_tokens(model, 24)
    diff = np.abs(reference_logits(model, tokens, ga_n=2, ga_w=4) - reference_logits(model, tokens))
    assert diff[:4].max() == 0.0  # the first W tokens see only neighbours
    assert diff.max() > 50 * ATOL  # so Self-Extend tests at ATOL can tell it from vanilla


def _rotate_pair(x: np.ndarray, pos: int, theta: float, neox: bool) -> np.ndarray:
    """RoPE of one vector via complex multiplication: pair i is (x[2i], x[2i+1]) or (x[i], x[i+d/2])."""
    d = x.shape[0]
    re, im = (x[: d // 2], x[d // 2 :]) if neox else (x[0::2], x[1::2])
    z = (re + 1j * im) * np.exp(1j * pos * theta ** (-2.0 * np.arange(d // 2) / d))
    return np.concatenate([z.real, z.imag]) if neox else np.stack([z.real, z.imag], axis=1).reshape(d)


@pytest.mark.parametrize("neox", [False, True], ids=["norm", "neox"])
@pytest.mark.parametrize(("ga_n", "ga_w"), [(1, 0), (2, 4), (3, 5), (4, 0)])
def test_self_extend_attention_matches_pairwise_definition(neox: bool, ga_n: int, ga_w: int) -> None:
    rng = np.random.default_rng(7)
    n, n_head, n_head_kv, d, theta = 9, 4, 2, 8, 100.0
    q, k, v = (rng.standard_normal((n, h, d)) for h in (n_head, n_head_kv, n_head_kv))
    pos = np.array([0, 1, 2, 5, 6, 9, 13, 14, 20])  # increasing, with gaps

    want = np.zeros((n, n_head, d))
    for h in range(n_head):
        kh = h // (n_head // n_head_kv)
        for i in range(n):
            pi = int(pos[i])
            scores = []
            for j in range(i + 1):
                pj = int(pos[j])
                if pi - pj < ga_w:
                    qi, kj = _rotate_pair(q[i, h], pi, theta, neox), _rotate_pair(k[j, kh], pj, theta, neox)
                else:
                    qi = _rotate_pair(q[i, h], pi // ga_n + ga_w - ga_w // ga_n, theta, neox)
                    kj = _rotate_pair(k[j, kh], pj // ga_n, theta, neox)
                scores.append(qi @ kj / np.sqrt(d))
            p = np.exp(np.array(scores) - max(scores))
            want[i, h] = (p / p.sum()) @ v[: i + 1, kh]

    got = self_extend_attention(q, k, v, pos, theta_base=theta, neox=neox, ga_n=ga_n, ga_w=ga_w)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)  # both float64; only summation order differs


def test_rope_keeps_relative_position_only() -> None:
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 1, 16)), rng.standard_normal((2, 1, 16))
    for neox in (False, True):

        def score(pq: int, pk: int) -> float:
            rq = rope(q, np.array([pq, pq]), theta_base=1e4, neox=neox)
            rk = rope(k, np.array([pk, pk]), theta_base=1e4, neox=neox)
            return float(rq[0, 0] @ rk[0, 0])

        assert score(9, 4) == pytest.approx(score(25, 20), abs=1e-12)
        assert score(9, 4) != pytest.approx(score(9, 5), abs=1e-3)


# --- reference vs vanilla llama.cpp ------------------------------------------------------------


@pytest.mark.parametrize("n_ubatch", [1, 7, None], ids=["ubatch1", "ubatch7", "ubatch-all"])
def test_reference_matches_llama_cpp(model: TinyModel, runner_for: RunnerFactory, n_ubatch: int | None) -> None:
    tokens = random_tokens(model, 40)
    got = runner_for(n_ctx=64, n_batch=64, n_ubatch=n_ubatch).decode(tokens)
    np.testing.assert_allclose(got, reference_logits(model, tokens), rtol=0, atol=ATOL)


def test_reference_matches_llama_cpp_over_several_decode_calls(
    model: TinyModel, runner_for: RunnerFactory
) -> None:
    tokens = random_tokens(model, 40, seed=1)
    got = runner_for(n_ctx=64, n_batch=16, n_ubatch=5).decode(tokens, chunk=9)  # 9+9+9+9+4
    np.testing.assert_allclose(got, reference_logits(model, tokens), rtol=0, atol=ATOL)


@pytest.mark.parametrize("kv_unified", [False, True], ids=["split-kv", "unified-kv"])
def test_two_sequences_in_one_batch(model: TinyModel, runner_for: RunnerFactory, kv_unified: bool) -> None:
    a, b = random_tokens(model, 23, seed=2), random_tokens(model, 17, seed=3)
    order = sorted([(i, 0) for i in range(len(a))] + [(i, 1) for i in range(len(b))])  # interleaved
    toks = [(a, b)[s][i] for i, s in order]
    runner = runner_for(n_ctx=128, n_batch=64, n_ubatch=7, n_seq_max=2, kv_unified=kv_unified)
    got = runner.decode_batch(toks, [i for i, _ in order], [s for _, s in order])

    rows = np.array([s for _, s in order])
    np.testing.assert_allclose(got[rows == 0], reference_logits(model, a), rtol=0, atol=ATOL)
    np.testing.assert_allclose(got[rows == 1], reference_logits(model, b), rtol=0, atol=ATOL)


def test_seq_rm_then_redecode(model: TinyModel, runner_for: RunnerFactory) -> None:
    first, second = random_tokens(model, 30, seed=4), random_tokens(model, 14, seed=5)
    runner = runner_for(n_ctx=64, n_batch=32, n_ubatch=7)
    runner.decode(first)
    assert runner.seq_rm(0, 18, -1)
    assert runner.seq_pos_max(0) == 17

    got = runner.decode(second)  # positions 18..31
    want = reference_logits(model, first[:18] + second)[18:]
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reference_positions_follow_kv_cells_after_shift(tmp_path: Path, arch: str) -> None:
    # One layer: cached K/V depend on the token alone, so a shifted cache equals a fresh run at the
    # shifted positions. Cells 6..11 move to 11..16; the next tokens continue at 17.
    model = make_tiny_gguf(tmp_path / "one-layer.gguf", arch=arch, n_layer=1, n_head_kv=2)
    first, second = random_tokens(model, 12, seed=6), random_tokens(model, 8, seed=7)
    with LlamaRunner(model.path, n_ctx=64, n_batch=32) as runner:
        runner.decode(first)
        runner.seq_add(0, 6, -1, 5)
        assert runner.seq_pos_max(0) == 16
        got = runner.decode(second)

    positions = [*range(6), *range(11, 17), *range(17, 25)]
    want = reference_logits(model, first + second, positions)[12:]
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["f16-kv", "flash-attn"])
def test_reference_matches_llama_cpp_with_f16_kv(
    model: TinyModel, runner_for: RunnerFactory, flash_attn: bool
) -> None:
    # llama.cpp's flash-attention path casts an f32 cache to f16, so FA is always an f16-K/V comparison.
    tokens = random_tokens(model, 40, seed=8)
    runner = runner_for(n_ctx=64, n_batch=64, flash_attn=flash_attn, type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16)
    got = runner.decode(tokens)
    np.testing.assert_allclose(got, reference_logits(model, tokens), rtol=0, atol=ATOL_F16)
