"""The harnesses on tiny random-weight models in our libllama: positions, contexts, results, perplexity.

Tolerance: with f32 weights and an f32 K/V cache llama.cpp computes the reference's maths in float32 (observed
~1e-6 on these models, see tests/native); the K-shift of the `shift` mode re-rotates cached keys once more in
float32. ATOL = 1e-4 leaves ample room and still catches a cell one position off (that moves logits by >1e-2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from tinymodel import TinyModel, reference_logits

import selfext_cpp
from selfext_cpp import SelfExtend, get_self_extend
from selfext_cpp.eval.modes import Contexts, Setting
from selfext_cpp.eval.passkey import PasskeyConfig, PasskeyRun, score
from selfext_cpp.eval.ppl import PplConfig, PplRun
from selfext_cpp.eval.runner import Runner, Sequence0, log_softmax_nll
from selfext_cpp.eval.shift import GroupShift, shifted_positions
from selfext_cpp.eval.speed import SpeedConfig, SpeedRun

ATOL = 1e-4  # see the module docstring
# GGML_TYPE_F32 cache; llama.cpp's own flash attention would cast it to f16 (vanilla and the `shift` mode use it)
F32_CACHE = {"type_k": 0, "type_v": 0, "n_threads": 2, "flash_attn": False}


def random_tokens(model: TinyModel, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, model.vocab_size, n).tolist()


@pytest.fixture
def one_layer_runner(tiny_one_layer: TinyModel):
    llm = selfext_cpp.load(tiny_one_layer.path, n_ctx=256, n_batch=24, n_ubatch=24, **F32_CACHE)
    with Runner(llm) as runner:
        yield runner
    llm.close()


def test_shift_mode_leaves_the_cache_at_the_documented_positions(tiny_one_layer: TinyModel,
                                                                  one_layer_runner: Runner) -> None:
    # 150 tokens in batches of 24, G = 4, W = 16: the last check saw 144 tokens, so 9 blocks are grouped.
    tokens = random_tokens(tiny_one_layer, 150)
    seq = Sequence0(one_layer_runner, GroupShift(4, 16))
    logits = seq.feed(tokens)[-1]
    expected = shifted_positions(150, 4, 16, 24)
    assert seq.shift is not None and seq.shift.steps == 9
    assert one_layer_runner.pos_min() == 0
    assert one_layer_runner.pos_max() == max(expected) == seq.n_past - 1
    # one layer: the last token's logits depend only on the cells' final positions
    np.testing.assert_allclose(logits, reference_logits(tiny_one_layer, tokens, expected)[-1], atol=ATOL)
    assert np.abs(logits - reference_logits(tiny_one_layer, tokens)[-1]).max() > 100 * ATOL  # the test has teeth


def test_shift_upstream_records_the_same_positions_but_rotates_keys_differently(
        tiny_one_layer: TinyModel, one_layer_runner: Runner) -> None:
    tokens = random_tokens(tiny_one_layer, 150)
    exact = Sequence0(one_layer_runner, GroupShift(4, 16)).feed(tokens)[-1]
    one_layer_runner.clear()
    upstream = Sequence0(one_layer_runner, GroupShift(4, 16, exact_div=False))
    logits = upstream.feed(tokens)[-1]
    assert one_layer_runner.pos_max() == max(shifted_positions(150, 4, 16, 24)) == upstream.n_past - 1
    assert np.abs(logits - exact).max() > 100 * ATOL


def test_llama_memory_seq_div_rotates_keys_to_2_p_old_minus_p_new(tiny_one_layer: TinyModel,
                                                                   one_layer_runner: Runner) -> None:
    """The pinned llama.cpp's K-shift sign bug in llama_kv_cells::pos_div, which `shift` works around.

    24 tokens at 0..23, divided by 4 (cells now at j // 4), then all moved up by 40 so that 36 more tokens at
    46..81 see every cell under either hypothesis; the last token's logits tell where the keys were rotated to.
    If this fails, the library was fixed: `shift-upstream` then equals `shift` and can go.
    """
    r, m = one_layer_runner, tiny_one_layer
    tokens = random_tokens(m, 60, seed=2)
    r.decode(tokens[:24], list(range(24)), [False] * 24)
    r.seq_div(0, 24, 4)
    r.seq_add(0, -1, 40)
    assert r.pos_max() == 23 // 4 + 40
    logits = r.decode(tokens[24:48], list(range(46, 70)), [False] * 24)
    logits = r.decode(tokens[48:], list(range(70, 82)))[-1]
    tail = list(range(46, 82))
    rotated = [2 * j - j // 4 + 40 for j in range(24)]
    np.testing.assert_allclose(logits, reference_logits(m, tokens, rotated + tail)[-1], atol=ATOL)
    r.clear()
    r.decode(tokens[:24], list(range(24)), [False] * 24)
    r.seq_div_exact(0, 24, 4)  # the workaround: keys end where the cells say
    r.seq_add(0, -1, 40)
    r.decode(tokens[24:48], list(range(46, 70)), [False] * 24)
    logits = r.decode(tokens[48:], list(range(70, 82)))[-1]
    intended = [j // 4 + 40 for j in range(24)]
    np.testing.assert_allclose(logits, reference_logits(m, tokens, intended + tail)[-1], atol=ATOL)


def test_plain_sequence_decodes_at_true_positions(tiny_one_layer: TinyModel, one_layer_runner: Runner) -> None:
    tokens = random_tokens(tiny_one_layer, 60, seed=1)
    logits = Sequence0(one_layer_runner).feed(tokens, logits_from=0)
    np.testing.assert_allclose(logits, reference_logits(tiny_one_layer, tokens), atol=ATOL)


def test_contexts_set_self_extend_and_rope_scaling_per_mode(tiny: TinyModel) -> None:
    with Contexts(tiny.path, n_ctx=256, n_batch=64, n_threads=2) as contexts:
        llm = contexts.sequence(Setting("selfext", 4, 16)).runner.llm
        assert get_self_extend(llm) == SelfExtend(4, 16)
        assert contexts.sequence(Setting("shift", 4, 16)).runner.llm is llm  # same context, Self-Extend off
        assert get_self_extend(llm) == SelfExtend(1, 0)
        yarn = contexts.sequence(Setting("yarn", rope_factor=4.0)).runner.llm
        assert yarn is not llm
        assert (yarn.context_params.rope_scaling_type, yarn.context_params.rope_freq_scale,
                yarn.context_params.yarn_orig_ctx) == (2, 0.25, 64)
        linear = contexts.sequence(Setting("linear", rope_factor=2.0)).runner.llm
        assert (linear.context_params.rope_scaling_type, linear.context_params.rope_freq_scale) == (1, 0.5)


def test_passkey_run_gives_one_result_per_mode_and_trial(tiny: TinyModel) -> None:
    modes = ("vanilla", "selfext", "shift", "shift-upstream", "yarn", "linear")
    cfg = PasskeyConfig(lengths=[300, 400], depths=[0.1, 0.9], trials=2, modes=modes, ga=SelfExtend(4, 16),
                        n_predict=4, n_batch=64, llama_kwargs={"n_threads": 2})
    run = PasskeyRun(tiny.path, cfg)
    try:
        results = list(run.run())
    finally:
        run.close()
    assert len(results) == 2 * 2 * 2 * 6
    assert [r.mode for r in results[:8]] == ["vanilla"] * 4 + ["selfext"] * 4
    for r in results:
        assert 0.9 * r.length < r.n_tokens <= r.length
        assert len(r.key) == 5 and r.correct == score(r.output, r.key)
        assert (r.ga_n, r.ga_w) == ((4, 16) if r.mode in ("selfext", "shift", "shift-upstream") else (1, 0))
        factor = (r.length + 4) / 64 if r.mode in ("yarn", "linear") else 1.0
        assert r.rope_factor == pytest.approx(factor)
    # a prompt reads the text it shares with the one before (same mode and length) from the cache
    for prev, r in zip([None, *results], results):
        first = prev is None or (prev.mode, prev.length) != (r.mode, r.length)
        if first or r.mode.startswith("shift"):
            assert r.reused == 0
        else:
            assert 0 <= r.reused < r.n_tokens and (r.reused > 0 or r.trial == 0)
    deep = [r for r in results if r.depth == 0.9 and r.mode == "vanilla"]
    shallow = [r for r in results if r.depth == 0.1 and r.mode == "vanilla"]
    assert all(d.key_position > s.key_position for d, s in zip(deep, shallow))
    assert run.total_tokens == (300 + 400) * 2 * 2 * 6


@pytest.mark.parametrize(("kwargs", "atol"), [
    (F32_CACHE, ATOL),
    # f16 cache, fused op: the kept cells were written in other batches than a fresh read writes them
    ({"n_threads": 2, "flash_attn": True}, 1e-2),
], ids=["f32-generic", "f16-fused"])
def test_a_resumed_sequence_reads_the_rest_like_a_fresh_one(tiny: TinyModel, kwargs: dict, atol: float) -> None:
    a = random_tokens(tiny, 200, seed=3)
    b = a[:150] + [3 + (a[150] - 2) % (tiny.vocab_size - 3)] + random_tokens(tiny, 59, seed=4)  # b[150] != a[150]
    settings = (Setting("vanilla"), Setting("selfext", 4, 16), Setting("yarn", rope_factor=4.0))
    with Contexts(tiny.path, n_ctx=512, n_batch=64, **kwargs) as contexts:
        for s in settings:
            fresh = contexts.sequence(s).feed(b)[-1]
            contexts.sequence(s).feed(a)
            seq = contexts.resume(s, b)
            assert (seq.n_tokens, seq.n_past, seq.runner.pos_max()) == (150, 150, 149)
            np.testing.assert_allclose(seq.feed(b[150:])[-1], fresh, atol=atol)
            assert contexts.resume(s, b).n_tokens == len(b) - 1  # the last token is always fed again
        contexts.sequence(Setting("vanilla")).feed(a)
        assert contexts.resume(Setting("selfext", 4, 16), a).n_tokens == 0  # cached under another setting
        contexts.sequence(Setting("shift", 4, 16)).feed(a)
        assert contexts.resume(Setting("shift", 4, 16), a).n_tokens == 0  # shifted cells are not token positions


def test_perplexity_matches_the_reference_and_scores_the_same_window(tiny_one_layer: TinyModel) -> None:
    text = " ".join(["the hello world"] * 200)
    run = PplRun(tiny_one_layer.path, text, PplConfig(lengths=[40, 90], modes=("vanilla",), window=16, n_batch=32,
                                                      llama_kwargs=F32_CACHE))
    try:
        results = list(run.run())
    finally:
        run.close()
    assert {a[1] for a in run.slices.values()} == {89}  # every length ends at the same token (BOS + 89)
    for r in results:
        a, b = run.slices[r.length]
        tokens = run.bos + run.text_tokens[a:b]
        ref = reference_logits(tiny_one_layer, tokens)[r.length - 17:r.length - 1]
        assert r.nll == pytest.approx(float(np.mean(log_softmax_nll(ref, tokens[-16:]))), abs=ATOL)
        assert r.ppl == pytest.approx(math.exp(r.nll), rel=1e-4)


def test_self_extend_that_is_not_needed_is_vanilla(tiny: TinyModel) -> None:
    text = " ".join(["the hello world"] * 100)
    run = PplRun(tiny.path, text, PplConfig(lengths=[48], modes=("vanilla", "selfext", "shift"), window=16,
                                            n_batch=32, llama_kwargs={"n_threads": 2}))
    try:
        v, s, sh = list(run.run())
    finally:
        run.close()
    assert (s.ga_n, sh.ga_n) == (1, 1)  # 48 tokens fit the 64 trained: --auto leaves attention alone
    assert v.nll == s.nll == sh.nll


def test_speed_run_measures_both_modes_with_flash_attention_off_and_on(tiny: TinyModel) -> None:
    run = SpeedRun(tiny.path, SpeedConfig(depths=[0, 100], n_prompt=16, n_gen=3, repeats=2, ga=SelfExtend(4, 16),
                                          n_batch=64, llama_kwargs={"n_threads": 2}))
    try:
        results = list(run.run())
    finally:
        run.close()
    assert [(r.flash_attn, r.depth, r.mode) for r in results] == [
        (fa, d, m) for fa in (False, True) for d in (0, 100) for m in ("vanilla", "selfext")]
    for r in results:
        assert len(r.prefill_runs) == len(r.decode_runs) == 2
        assert r.prefill_tps > 0 and r.decode_tps > 0
        assert (r.ga_n, r.ga_w) == ((4, 16) if r.mode == "selfext" else (1, 0))
