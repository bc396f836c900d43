"""Our libllama's Self-Extend equals the float64 NumPy reference of the formula.

Tolerances: with an f32 K/V cache the graph computes in float32 and the grouped logits add two RoPE
rotations (the cached key's and the extra one), each exact up to float32 rounding: ATOL = 1e-4 on O(1.5)
logits (observed <= ~5e-6; vanilla alone reaches 1.4e-6). A wrong grouped position moves logits by ~1e-1,
a wrong neighbour boundary by more, so the tolerance separates right from wrong by three orders. f16 and q8_0
K caches round every cached key (rel. 5e-4 and ~4e-3): ATOL_F16 = 1e-2, ATOL_Q8 = 5e-2. On a GPU build
(SELFEXT_TEST_NGL > 0) the matmuls themselves round to ~3e-3: GPU_ATOL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tinymodel import (GGML_TYPE_F16, GPU_ATOL, ON_GPU, GgmlTensor, LlamaRunner, RunnerFactory, TinyModel,
                       make_tiny_gguf, reference_logits)

ATOL = GPU_ATOL if ON_GPU else 1e-4
ATOL_F16 = max(1e-2, GPU_ATOL) if ON_GPU else 1e-2
ATOL_Q8 = 5e-2
ATOL_LONG = max(2e-3, GPU_ATOL) if ON_GPU else 2e-3  # see test_long_positions
GGML_TYPE_Q8_0 = 8
N_TOKENS = 100  # the tiny models are trained to 64 positions


@pytest.fixture(params=["generic", "fused", "fused-table", "fused-cache"])
def attn_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test below runs on both Self-Extend paths: the generic graph (flash attention off) and the fused
    GGML_OP_FLASH_ATTN_EXT_SE (flash attention on; with an f32 cache the op computes in f32, same ATOL), the latter
    in every form of the grouped keys: the default (the table of steps on the CPU, the rotation table on CUDA), the
    rotation table and the grouped-key cache."""
    if request.param in ("fused-table", "fused-cache"):
        monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", request.param.removeprefix("fused-"))
    return str(request.param)


def tokens_for(model: TinyModel, n: int = N_TOKENS, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, model.vocab_size, n).tolist()


def assert_close(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    err = float(np.max(np.abs(got - want)))
    assert err <= atol, f"max |llama.cpp - reference| = {err:.3g} > {atol}"


@pytest.mark.parametrize("ga_w", [1, 4, 16, 33])
@pytest.mark.parametrize("ga_n", [1, 2, 3, 4, 8])
def test_logits_match_reference(model: TinyModel, runner_for: RunnerFactory, attn_path: str, ga_n: int,
                                ga_w: int) -> None:
    tokens = tokens_for(model)
    r = runner_for()
    assert r.set_self_extend(ga_n, ga_w) == 0
    # G = 1 is plain llama.cpp, whose flash attention casts an f32 cache to f16
    atol = ATOL_F16 if attn_path.startswith("fused") and ga_n == 1 else ATOL
    assert_close(r.decode(tokens), reference_logits(model, tokens, ga_n=ga_n, ga_w=ga_w), atol)


@pytest.mark.parametrize("ubatch", [1, 7, 64, N_TOKENS])
@pytest.mark.parametrize(("ga_n", "ga_w"), [(4, 16), (3, 33)])
def test_any_ubatch_size(model: TinyModel, runner_for: RunnerFactory, ubatch: int, ga_n: int,
                         ga_w: int) -> None:
    tokens = tokens_for(model, seed=1)
    r = runner_for(n_batch=N_TOKENS, n_ubatch=ubatch)
    assert r.set_self_extend(ga_n, ga_w) == 0
    assert_close(r.decode(tokens), reference_logits(model, tokens, ga_n=ga_n, ga_w=ga_w), ATOL)


def test_token_by_token_decode(model: TinyModel, runner_for: RunnerFactory) -> None:
    tokens = tokens_for(model, 80, seed=2)
    r = runner_for()
    assert r.set_self_extend(4, 16) == 0
    assert_close(r.decode(tokens, chunk=1), reference_logits(model, tokens, ga_n=4, ga_w=16), ATOL)


@pytest.mark.parametrize("kv_unified", [False, True])
def test_two_sequences_in_one_batch(model: TinyModel, runner_for: RunnerFactory,
                                    kv_unified: bool) -> None:
    a, b = tokens_for(model, 90, seed=3), tokens_for(model, 70, seed=4)
    r = runner_for(n_ctx=512, n_batch=256, n_seq_max=2, kv_unified=kv_unified)
    assert r.set_self_extend(2, 16) == 0
    # interleave the two sequences in each batch: a[i] at position i in seq 0, b[i] in seq 1
    toks, pos, seqs = [], [], []
    for i in range(max(len(a), len(b))):
        for s, seq in enumerate((a, b)):
            if i < len(seq):
                toks.append(seq[i]), pos.append(i), seqs.append(s)
    logits = np.concatenate([r.decode_batch(toks[i:i + 64], pos[i:i + 64], seqs[i:i + 64])
                             for i in range(0, len(toks), 64)])
    seqs_arr = np.array(seqs)
    assert_close(logits[seqs_arr == 0], reference_logits(model, a, ga_n=2, ga_w=16), ATOL)
    assert_close(logits[seqs_arr == 1], reference_logits(model, b, ga_n=2, ga_w=16), ATOL)


def test_seq_rm_then_redecode(model: TinyModel, runner_for: RunnerFactory) -> None:
    first, other = tokens_for(model, 100, seed=5), tokens_for(model, 40, seed=6)
    r = runner_for()
    assert r.set_self_extend(4, 8) == 0
    r.decode(first)
    assert r.seq_rm(0, 60, -1)
    tokens = first[:60] + other
    got = r.decode(other)  # continues at position 60 on the kept prefix
    assert_close(got, reference_logits(model, tokens, ga_n=4, ga_w=8)[60:], ATOL)


def test_group_size_one_equals_vanilla(model: TinyModel, runner_for: RunnerFactory) -> None:
    tokens = tokens_for(model, seed=7)
    vanilla = runner_for().decode(tokens)
    r = runner_for()
    assert r.set_self_extend(1, 16) == 0
    np.testing.assert_allclose(r.decode(tokens), vanilla, rtol=0, atol=1e-5)


def test_switching_on_a_live_context_after_clearing_the_memory(
        model: TinyModel, runner_for: RunnerFactory) -> None:
    tokens = tokens_for(model, seed=8)
    r = runner_for()
    vanilla = r.decode(tokens)
    assert r.set_self_extend(4, 16) == 0
    r.clear()
    assert_close(r.decode(tokens), reference_logits(model, tokens, ga_n=4, ga_w=16), ATOL)
    assert r.set_self_extend(1, 0) == 0
    r.clear()
    np.testing.assert_array_equal(r.decode(tokens), vanilla)


def test_state_save_and_load(model: TinyModel, runner_for: RunnerFactory) -> None:
    tokens = tokens_for(model, seed=9)
    src = runner_for()
    assert src.set_self_extend(3, 16) == 0
    src.decode(tokens[:80])
    ll = src._ll
    size = ll.llama_state_get_size(src.ctx)
    buf = (ctypes_u8 := __import__("ctypes").c_uint8 * size)()
    assert ll.llama_state_get_data(src.ctx, buf, size) == size
    dst = runner_for()
    assert dst.set_self_extend(3, 16) == 0
    assert ll.llama_state_set_data(dst.ctx, buf, size) == size
    del ctypes_u8
    assert_close(dst.decode(tokens[80:], positions=range(80, N_TOKENS)),
                 reference_logits(model, tokens, ga_n=3, ga_w=16)[80:], ATOL)


@pytest.mark.parametrize(("flash_attn", "fused"), [(False, False), (True, not ON_GPU)])
def test_flash_attention_selects_the_fused_op(model: TinyModel, runner_for: RunnerFactory, flash_attn: bool,
                                              fused: bool) -> None:
    # the CPU runs the op for any cache type; the CUDA kernel takes f16 caches and head sizes 64/128/256 (others
    # keep the generic path)
    r = runner_for(flash_attn=flash_attn)
    assert not r.fused
    assert r.set_self_extend(4, 16) == 0
    assert r.fused == fused
    assert r.set_self_extend(1, 0) == 0
    assert not r.fused
    f16 = runner_for(flash_attn=flash_attn, type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16)
    assert f16.set_self_extend(4, 16) == 0
    assert f16.fused == (flash_attn and (not ON_GPU or model.head_dim in (64, 128, 256)))


@pytest.mark.parametrize("n_tokens", [1, 17, 64])
@pytest.mark.parametrize(("keys", "q_rows"), [("steps", True), ("table", True), ("cache", False)])
def test_the_table_form_rotates_the_queries_in_the_op(model: TinyModel, n_tokens: int, keys: str, q_rows: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused op: with the rotation table or the table of steps every ubatch, a decode step or a prefill, hands the op
    its queries' rows of the table and has no RoPE node for its grouped queries (one launch and one pass over the
    queries less per layer); with the grouped-key cache the queries are rotated by that node. The logits are the
    reference's either way (test_token_by_token_decode, test_any_ubatch_size)."""
    if ON_GPU and model.head_dim not in (64, 128, 256):
        pytest.skip("the CUDA kernel takes head sizes 64, 128 and 256")
    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", keys)
    names: list[str] = []
    with LlamaRunner(model.path, n_ctx=256, flash_attn=True, type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16,
                     on_node=names.append) as r:
        assert r.set_self_extend(4, 16) == 0 and r.fused
        r.decode(tokens_for(model, 40))
        names.clear()
        r.decode(tokens_for(model, n_tokens, seed=1))
    rope_nodes = [n for n in names if re.fullmatch(r"se_q_grouped-\d+", n)]  # not their views
    assert len(rope_nodes) == (0 if q_rows else model.n_layer), rope_nodes
    assert any(n.startswith("se_q_rot_rows") for n in names) == q_rows
    assert any(n.startswith("se_k_rot_rows") for n in names) == (keys == "table")  # rows per cell: the table form's
    assert not any(n.startswith("se_k_steps") for n in names)  # the table of steps is kept with the cache


@pytest.mark.parametrize("flash_attn", [False, True])
def test_f16_cache_and_flash_attention(model: TinyModel, runner_for: RunnerFactory,
                                       flash_attn: bool) -> None:
    tokens = tokens_for(model, seed=10)
    r = runner_for(type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16, flash_attn=flash_attn)
    assert r.set_self_extend(4, 16) == 0
    assert_close(r.decode(tokens), reference_logits(model, tokens, ga_n=4, ga_w=16), ATOL_F16)


def test_get_self_extend_reads_back(model: TinyModel, runner_for: RunnerFactory) -> None:
    from selfext_cpp import capi

    r = runner_for()
    assert capi.get_self_extend(r.ctx) == (1, 0)
    assert r.set_self_extend(8, 32) == 0
    assert capi.get_self_extend(r.ctx) == (8, 32)
    assert r.set_self_extend(1, 32) == 0
    assert capi.get_self_extend(r.ctx) == (1, 0)


@pytest.mark.parametrize(("ga_n", "ga_w"), [(0, 16), (-1, 16), (2, 0), (4, -3)])
def test_invalid_values_are_refused_and_leave_the_context_unchanged(
        model: TinyModel, runner_for: RunnerFactory, ga_n: int, ga_w: int) -> None:
    from selfext_cpp import capi

    r = runner_for()
    assert r.set_self_extend(4, 16) == 0
    assert r.set_self_extend(ga_n, ga_w) == capi.LLAMA_SELF_EXTEND_ERR_INVALID_ARG
    assert capi.get_self_extend(r.ctx) == (4, 16)


KEYS = ("steps", "table", "cache")


def test_the_library_names_the_forms_as_the_package_does() -> None:
    """llama_self_extend_keys_str names each LLAMA_SELF_EXTEND_KEYS_* value (the names LLAMA_SELF_EXTEND_KEYS and
    llama-server's log line use) as selfext_cpp.engine.KEYS_FORMS does, in the C enum's order; NONE and values past
    the enum have no name."""
    from selfext_cpp import capi
    from selfext_cpp.engine import KEYS_FORMS

    assert [capi.keys_str(k) for k in range(len(KEYS_FORMS))] == list(KEYS_FORMS)
    assert capi.keys_str(capi.LLAMA_SELF_EXTEND_KEYS_NONE) is None
    assert capi.keys_str(len(KEYS_FORMS)) is None


@pytest.mark.parametrize("keys", KEYS)
def test_a_form_of_the_grouped_keys_asked_through_the_api(model: TinyModel, keys: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """llama_set_self_extend_keys picks the fused path's form (over LLAMA_SELF_EXTEND_KEYS, which names another one
    here), llama_get_self_extend_keys reads it back, and every form gives the reference's logits."""
    if ON_GPU and model.head_dim not in (64, 128, 256):
        pytest.skip("the CUDA kernel takes head sizes 64, 128 and 256")
    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", next(k for k in KEYS if k != keys))
    tokens = tokens_for(model, seed=20)
    with LlamaRunner(model.path, n_ctx=256, flash_attn=True) as r:
        assert r.keys is None  # Self-Extend off
        assert r.set_keys(keys) == 0 and r.keys is None  # kept for the setting below
        assert r.set_self_extend(4, 16) == 0 and r.fused
        assert r.keys == keys
        got = r.decode(tokens)
    assert_close(got, reference_logits(model, tokens, ga_n=4, ga_w=16), ATOL)


@pytest.mark.parametrize(("first", "then"), [("cache", "steps"), ("steps", "table"), ("table", "cache")])
def test_a_live_context_changes_its_form_and_rebuilds_from_k(model: TinyModel, first: str, then: str) -> None:
    """Asked for on a context whose fused path has run, the new form is made at once, what it keeps is rebuilt from
    the cached K by the next llama_decode (token by token: decode steps, which read what the form kept), and the
    logits stay the reference's; "auto" then gives back the library's choice."""
    if ON_GPU and model.head_dim not in (64, 128, 256):
        pytest.skip("the CUDA kernel takes head sizes 64, 128 and 256")
    tokens = tokens_for(model, seed=21)
    with LlamaRunner(model.path, n_ctx=256, flash_attn=True) as r:
        assert r.set_keys(first) == 0 and r.set_self_extend(4, 16) == 0 and r.keys == first
        head = r.decode(tokens[:60])
        assert r.set_keys(then) == 0 and r.keys == then
        tail = r.decode(tokens[60:], chunk=1)
        assert r.set_keys("auto") == 0
        assert r.keys == "steps"  # auto's choice on the CPU (a GPU skips these heads of 16 above)
    want = reference_logits(model, tokens, ga_n=4, ga_w=16)
    assert_close(np.concatenate([head, tail]), want, ATOL)


def test_every_form_in_turn_on_one_live_context(wide_model: TinyModel) -> None:
    """As above on heads of 64 with an f16 cache, which the CUDA op takes too: the grouped keys, then the table of
    steps, then the rotation table, each asked for between decode steps of one sequence."""
    tokens = tokens_for(wide_model, seed=22)
    with LlamaRunner(wide_model.path, n_ctx=256, flash_attn=True, type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16) as r:
        assert r.set_keys("cache") == 0 and r.set_self_extend(4, 16) == 0 and r.keys == "cache"
        parts = [r.decode(tokens[:40])]
        for keys, part in (("steps", tokens[40:70]), ("table", tokens[70:])):
            assert r.set_keys(keys) == 0 and r.keys == keys
            parts.append(r.decode(part, chunk=1))
    assert_close(np.concatenate(parts), reference_logits(wide_model, tokens, ga_n=4, ga_w=16), ATOL_F16)


def test_asking_for_the_form_in_use_keeps_the_compute_buffers(wide_model: TinyModel,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    """Naming the form that auto took changes no graph, so the next decode reserves nothing (llama.cpp logs
    "sched_reserve: reserving" when it does); naming another form does."""
    from selfext_cpp.engine import set_llama_log

    tokens = tokens_for(wide_model, seed=23)
    with LlamaRunner(wide_model.path, n_ctx=256, flash_attn=True, type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16) as r:
        set_llama_log(True)  # llama.cpp's log to stderr, whichever callback an earlier test left
        try:
            assert r.set_self_extend(4, 16) == 0
            r.decode(tokens[:40])
            auto = r.keys
            capfd.readouterr()
            assert r.set_keys(auto) == 0 and r.keys == auto
            r.decode(tokens[40:42], chunk=1)
            assert "reserving" not in capfd.readouterr().err
            other = "cache" if auto != "cache" else "steps"
            assert r.set_keys(other) == 0 and r.keys == other
            r.decode(tokens[42:44], chunk=1)
            assert "reserving" in capfd.readouterr().err
        finally:
            set_llama_log(False)


@pytest.mark.parametrize("keys", [-2, 4, 99])
def test_an_unknown_form_is_refused_and_changes_nothing(wide_model: TinyModel, keys: int) -> None:
    from selfext_cpp import capi

    with LlamaRunner(wide_model.path, n_ctx=256, flash_attn=True, type_k=GGML_TYPE_F16,
                     type_v=GGML_TYPE_F16) as r:  # heads of 64 and an f16 cache: fused on CUDA too
        assert r.set_keys("cache") == 0 and r.set_self_extend(4, 16) == 0
        assert capi.llama_set_self_extend_keys(r.ctx, keys) == capi.LLAMA_SELF_EXTEND_ERR_INVALID_ARG
        assert r.keys == "cache"


def test_the_generic_path_keeps_no_form(model: TinyModel) -> None:
    """Flash attention off: no fused path, so no grouped keys in any form, whatever was asked."""
    with LlamaRunner(model.path, n_ctx=256, flash_attn=False) as r:
        assert r.set_keys("table") == 0 and r.set_self_extend(4, 16) == 0
        assert not r.fused and r.keys is None


# --- quantized K cache with the Hadamard rotation llama.cpp applies when head_dim % 64 == 0 -------------


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    path = tmp_path_factory.mktemp("gguf") / "llama-d64.gguf"
    return make_tiny_gguf(path, arch="llama", n_embd=128, n_head=2, n_head_kv=1, seed=11)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["generic", "fused"])
@pytest.mark.parametrize("type_k", [GGML_TYPE_F16, GGML_TYPE_Q8_0])
def test_quantized_k_cache(wide_model: TinyModel, type_k: int, flash_attn: bool) -> None:
    tokens = tokens_for(wide_model, seed=12)
    kw = dict(n_ctx=256, type_k=type_k, type_v=GGML_TYPE_F16, flash_attn=flash_attn)
    with LlamaRunner(wide_model.path, **kw) as r:
        assert r.set_self_extend(4, 16) == 0
        got = r.decode(tokens)
    with LlamaRunner(wide_model.path, **kw) as r:
        vanilla = r.decode(tokens)
    want = reference_logits(wide_model, tokens, ga_n=4, ga_w=16)
    atol = ATOL_Q8 if type_k == GGML_TYPE_Q8_0 else ATOL_F16
    assert_close(got, want, atol)
    # the cache's rounding error is far below the effect of Self-Extend itself
    assert np.max(np.abs(vanilla - want)) > 10 * atol


def test_auto_takes_the_table_of_steps_but_on_a_gpu_of_this_host(wide_model: TinyModel,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The default form of the grouped keys: the table of steps where K is in host memory (and on an RPC server,
    tests/rpc); on a GPU of this host the rotation table or the grouped keys (this model's table would be as large as
    its grouped keys: those), which the CUDA decode kernel reads faster at short depths (docs/RESULTS.md 4.5). Seen in
    the graph: the steps form hands the op its queries' rows and no rows per cell."""
    monkeypatch.delenv("LLAMA_SELF_EXTEND_KEYS", raising=False)
    names: list[str] = []
    with LlamaRunner(wide_model.path, n_ctx=256, flash_attn=True, type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16,
                     on_node=names.append) as r:
        assert r.set_self_extend(4, 16) == 0 and r.fused
        r.decode(tokens_for(wide_model, 17))
    q_rows = any(n.startswith("se_q_rot_rows") for n in names)  # a table form, not the grouped-key cache
    k_rows = any(n.startswith("se_k_rot_rows") for n in names)  # the rotation table: rows per cell
    assert (q_rows and not k_rows) == (not ON_GPU)


# --- positions in the tens of thousands --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["generic", "fused"])
@pytest.mark.parametrize(("ga_n", "ga_w", "shift"), [(1, 0, 30000), (8, 16, 30000), (4, 33, 5000)])
def test_long_positions(tmp_path: Path, arch: str, ga_n: int, ga_w: int, shift: int, flash_attn: bool) -> None:
    """Cells moved to positions ~30K with llama_memory_seq_add (a 1-layer model, where a shifted cache equals a
    fresh run at the new positions). float32 RoPE at such positions rounds to ~3e-4 in llama.cpp already
    (vanilla, ga_n = 1, is in this table too), so ATOL_LONG = 2e-3; a wrong grouped position costs ~1e-1.
    On the fused path the shift also makes the grouped-key cache rebuild itself from the moved keys."""
    model = make_tiny_gguf(tmp_path / f"{arch}-1layer.gguf", arch=arch, n_layer=1, n_head_kv=2, seed=5)
    tokens = tokens_for(model, seed=13)
    with LlamaRunner(model.path, n_ctx=256, flash_attn=flash_attn) as r:
        assert r.set_self_extend(ga_n, ga_w) == 0
        r.decode(tokens[:60])
        r.seq_add(0, 30, -1, shift)
        got = r.decode(tokens[60:])  # continues after the moved cells
    positions = list(range(30)) + list(range(30 + shift, N_TOKENS + shift))
    assert_close(got, reference_logits(model, tokens, positions, ga_n=ga_n, ga_w=ga_w)[60:], ATOL_LONG)


def test_positions_past_the_cache_take_a_larger_table_of_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps form: the table of steps kept with the cache covers positions up to its size, so a graph uploads none; cells
    moved past that (llama_memory_seq_add) make the next graphs take a larger table as an input, with the logits of a
    fresh run at those positions (one layer, as test_long_positions)."""
    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", "steps")
    model = make_tiny_gguf(tmp_path / "llama-1layer.gguf", arch="llama", n_layer=1, n_head_kv=2, seed=5)
    if ON_GPU and model.head_dim not in (64, 128, 256):
        pytest.skip("the CUDA kernel takes head sizes 64, 128 and 256")
    tokens = tokens_for(model, seed=13)
    names: list[str] = []
    shift = 30000
    with LlamaRunner(model.path, n_ctx=256, flash_attn=True, on_node=names.append) as r:
        assert r.set_self_extend(8, 16) == 0 and r.fused
        r.decode(tokens[:60])
        assert not any(n.startswith("se_k_steps") for n in names)
        r.seq_add(0, 30, -1, shift)
        names.clear()
        got = r.decode(tokens[60:])
        assert any(n.startswith("se_k_steps") for n in names)
    positions = list(range(30)) + list(range(30 + shift, N_TOKENS + shift))
    assert_close(got, reference_logits(model, tokens, positions, ga_n=8, ga_w=16)[60:], ATOL_LONG)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["generic", "fused"])
def test_changing_the_setting_on_a_filled_cache(tmp_path: Path, flash_attn: bool) -> None:
    """With one layer the cached keys do not depend on Self-Extend, so after a change of G the next tokens must
    match a fresh run under the new setting: on the fused path the grouped keys are rebuilt for the new G."""
    model = make_tiny_gguf(tmp_path / "llama-1layer.gguf", arch="llama", n_layer=1, n_head_kv=2, seed=6)
    tokens = tokens_for(model, seed=15)
    with LlamaRunner(model.path, n_ctx=256, flash_attn=flash_attn) as r:
        assert r.set_self_extend(4, 16) == 0
        r.decode(tokens[:60])
        assert r.set_self_extend(8, 16) == 0
        got = r.decode(tokens[60:])
    assert_close(got, reference_logits(model, tokens, ga_n=8, ga_w=16)[60:], ATOL)


# --- one sequence's moved or restored keys, next to others' (llama-server's slots) ---------------------------


def _interleaved(r: LlamaRunner, seqs: dict[int, tuple[list[int], list[int]]]) -> dict[int, np.ndarray]:
    """Decode several sequences in shared batches (tokens, positions per seq id); logits per seq id."""
    toks, pos, ids = [], [], []
    for i in range(max(len(t) for t, _ in seqs.values())):
        for s, (t, p) in seqs.items():
            if i < len(t):
                toks.append(t[i]), pos.append(p[i]), ids.append(s)
    logits = np.concatenate([r.decode_batch(toks[i:i + 64], pos[i:i + 64], ids[i:i + 64])
                             for i in range(0, len(toks), 64)])
    ids_arr = np.array(ids)
    return {s: logits[ids_arr == s] for s in seqs}


def _fused_op_kinds(ops: list[tuple[bool, int]]) -> Callable[[GgmlTensor], None]:
    """An on_tensor callback that records (has a mask, masks by the positions) for every fused op node."""
    def record(node: GgmlTensor) -> None:
        if node.name.startswith(b"fattn_self_extend"):
            ops.append((bool(node.src[3]), node.op_params[10]))
    return record


@pytest.mark.parametrize("kv_unified", [False, True], ids=["split-kv", "unified-kv"])
def test_fused_op_masks_one_sequence_by_positions(model: TinyModel, kv_unified: bool) -> None:
    """A context of one sequence (the CLI's, the Python server's): every fused op, prefill and decode, masks by the
    positions and reads no llama.cpp mask; the logits are the reference's."""
    if ON_GPU and model.head_dim not in (64, 128, 256):
        pytest.skip("the CUDA kernel takes head sizes 64, 128 and 256")
    ops: list[tuple[bool, int]] = []
    tokens = tokens_for(model, 80, seed=27)
    with LlamaRunner(model.path, n_ctx=256, n_batch=64, n_ubatch=16, kv_unified=kv_unified, flash_attn=True,
                     on_tensor=_fused_op_kinds(ops)) as r:
        assert r.set_self_extend(4, 16) == 0 and r.fused
        got = np.concatenate([r.decode(tokens[:64]), r.decode(tokens[64:], chunk=1)])
    assert set(ops) == {(False, 1)} and len(ops) == model.n_layer * (4 + 16)
    assert_close(got, reference_logits(model, tokens, ga_n=4, ga_w=16), ATOL)


@pytest.mark.parametrize("kv_unified", [False, True], ids=["stream-per-seq", "unified"])
def test_fused_op_masks_by_positions_where_each_stream_holds_one_sequence(model: TinyModel, kv_unified: bool) -> None:
    """With a stream per sequence the fused op masks every ubatch by the positions (ggml_flash_attn_ext_se_causal: a
    key is visible when 0 <= its position <= the query's) and takes no llama.cpp mask, which is then neither filled nor
    uploaded (n_tokens x n_kv halves a ubatch), also for a ubatch of both sequences; a unified cache of two sequences
    keeps that mask for every ubatch, as llama.cpp reserved its memory. The logits are the reference's in every phase
    (the two sequences sit at the same positions)."""
    if ON_GPU and model.head_dim not in (64, 128, 256):
        pytest.skip("the CUDA kernel takes head sizes 64, 128 and 256")
    ops: list[tuple[bool, int]] = []

    def phase(decode: Callable[[], dict[int, np.ndarray]]) -> tuple[dict[int, np.ndarray], set[tuple[bool, int]]]:
        ops.clear()
        return decode(), set(ops)

    a, b = tokens_for(model, 70, seed=25), tokens_for(model, 64, seed=26)
    want = {0: reference_logits(model, a, ga_n=4, ga_w=16), 1: reference_logits(model, b, ga_n=4, ga_w=16)}
    by_positions, with_mask = {(False, 1)}, {(True, 0)}
    with LlamaRunner(model.path, n_ctx=512, n_batch=256, n_seq_max=2, kv_unified=kv_unified, flash_attn=True,
                     on_tensor=_fused_op_kinds(ops)) as r:
        assert r.set_self_extend(4, 16) == 0 and r.fused
        expected = with_mask if kv_unified else by_positions
        # one sequence per batch, at the same positions
        got, kinds = phase(lambda: {0: r.decode(a[:50])})
        assert kinds == expected
        assert_close(got[0], want[0][:50], ATOL)
        got, kinds = phase(lambda: {1: r.decode(b[:50], seq_id=1)})
        assert kinds == expected
        assert_close(got[1], want[1][:50], ATOL)
        # both in one batch
        got, kinds = phase(lambda: _interleaved(r, {0: (a[50:60], list(range(50, 60))),
                                                    1: (b[50:60], list(range(50, 60)))}))
        assert kinds == expected
        assert_close(got[0], want[0][50:60], ATOL)
        assert_close(got[1], want[1][50:60], ATOL)
        # and one at a time again, token by token
        got, kinds = phase(lambda: {1: r.decode(b[60:], seq_id=1, chunk=1), 0: r.decode(a[60:], chunk=1)})
        assert kinds == expected
        assert_close(got[0], want[0][60:], ATOL)
        assert_close(got[1], want[1][60:], ATOL)


@pytest.mark.parametrize("kv_unified", [False, True], ids=["stream-per-seq", "unified"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["generic", "fused"])
def test_shifting_one_sequence_leaves_the_other_exact(tmp_path: Path, kv_unified: bool, flash_attn: bool) -> None:
    """A K-shift of sequence 1 marks only its cells' grouped keys stale (the fused path rebuilds just those);
    both sequences then continue exactly as fresh runs at their positions (one layer: a shifted cache equals a
    fresh run at the new positions; shifts of 500 round like test_long_positions, ATOL_LONG)."""
    model = make_tiny_gguf(tmp_path / "llama-1layer.gguf", arch="llama", n_layer=1, n_head_kv=2, seed=7)
    a, b = tokens_for(model, 90, seed=20), tokens_for(model, 90, seed=21)
    with LlamaRunner(model.path, n_ctx=512, n_batch=256, n_seq_max=2, kv_unified=kv_unified,
                     flash_attn=flash_attn) as r:
        assert r.set_self_extend(4, 16) == 0
        _interleaved(r, {0: (a[:60], list(range(60))), 1: (b[:60], list(range(60)))})
        r.seq_add(1, 30, -1, 500)
        got = _interleaved(r, {0: (a[60:], list(range(60, 90))), 1: (b[60:], list(range(560, 590)))})
    assert_close(got[0], reference_logits(model, a, ga_n=4, ga_w=16)[60:], ATOL_LONG)
    pos_b = list(range(30)) + list(range(530, 590))
    assert_close(got[1], reference_logits(model, b, pos_b, ga_n=4, ga_w=16)[60:], ATOL_LONG)


@pytest.mark.parametrize("kv_unified", [False, True], ids=["stream-per-seq", "unified"])
def test_restoring_one_sequence_leaves_the_other_exact(model: TinyModel, runner_for: RunnerFactory,
                                                       attn_path: str, kv_unified: bool) -> None:
    """A sequence's saved state loaded back over other tokens (llama-server's prompt cache) continues exactly,
    and so does the sequence next to it: only the loaded cells' grouped keys are rebuilt."""
    import ctypes

    a, b, junk = tokens_for(model, 90, seed=22), tokens_for(model, 90, seed=23), tokens_for(model, 50, seed=24)
    r = runner_for(n_ctx=512, n_batch=256, n_seq_max=2, kv_unified=kv_unified)
    assert r.set_self_extend(3, 16) == 0
    _interleaved(r, {0: (a[:60], list(range(60))), 1: (b[:60], list(range(60)))})
    ll = r._ll
    size = ll.llama_state_seq_get_size(r.ctx, 1)
    buf = (ctypes.c_uint8 * size)()
    assert ll.llama_state_seq_get_data(r.ctx, buf, size, 1) == size
    assert r.seq_rm(1)
    r.decode(junk, seq_id=1)  # other keys in the freed cells
    assert r.seq_rm(1)
    assert ll.llama_state_seq_set_data(r.ctx, buf, size, 1) == size
    got = _interleaved(r, {0: (a[60:], list(range(60, 90))), 1: (b[60:], list(range(60, 90)))})
    assert_close(got[0], reference_logits(model, a, ga_n=3, ga_w=16)[60:], ATOL)
    assert_close(got[1], reference_logits(model, b, ga_n=3, ga_w=16)[60:], ATOL)
