"""Self-Extend parameters: validation, the paper's capacity, and the automatic choice (pure Python)."""

from __future__ import annotations

import pytest

from selfext_cpp import CapacityError, ParameterError, SelfExtend, capacity, choose, engine, plan
from selfext_cpp.engine import auto_window, check_request


@pytest.mark.parametrize(("ga_n", "ga_w"), [(0, 16), (-2, 16), (2, 0), (2, -1), (True, 16), (2.0, 16)])
def test_invalid_values_are_parameter_errors(ga_n: object, ga_w: object) -> None:
    with pytest.raises(ParameterError):
        SelfExtend(ga_n, ga_w)  # type: ignore[arg-type]


def test_group_size_one_ignores_the_window_and_keeps_the_trained_context() -> None:
    assert SelfExtend(1, 0).capacity(8192) == 8192
    assert not SelfExtend(1, 0).enabled


@pytest.mark.parametrize(("L", "G", "W", "want"), [(8192, 8, 2048, 51200), (8192, 4, 512, 31232),
                                                    (4096, 2, 1024, 7168)])
def test_capacity_is_the_papers(L: int, G: int, W: int, want: int) -> None:
    assert capacity(L, G, W) == want == (L - W) * G + W


def test_window_at_or_past_the_trained_context_is_refused_with_a_hint() -> None:
    with pytest.raises(ParameterError, match=r"ga_w 8192 must be smaller .* try ga_w 2048"):
        SelfExtend(4, 8192).check(8192)


def test_text_beyond_capacity_names_it_and_a_setting_that_fits() -> None:
    with pytest.raises(CapacityError, match=r"40000 tokens exceed the capacity 31232 .* try ga_n \d+ ga_w \d+"):
        SelfExtend(4, 512).check(8192, 40000)


def test_messages_name_parameters_and_a_front_end_renders_them_its_way() -> None:
    with pytest.raises(ParameterError) as err:
        SelfExtend(0, 16)
    assert str(err.value) == "ga_n must be an integer >= 1, got 0"
    assert err.value.render({"ga_n": "--ga-n"}) == "--ga-n must be an integer >= 1, got 0"
    assert ParameterError("{nothing} and {ga_w}").render() == "{nothing} and ga_w"  # only known parameters


@pytest.mark.parametrize(("G", "W", "n"), [(4, 16, 1), (4, 16, 16), (4, 16, 17), (4, 16, 208), (3, 7, 100),
                                           (8, 20, 300), (1, 0, 50)])
def test_farthest_is_the_largest_relative_position_of_the_formula(G: int, W: int, n: int) -> None:
    def pos(i: int, j: int) -> int:  # the docs' rule, for query i and key j
        return i - j if i - j < W or G == 1 else i // G + W - W // G - j // G
    assert SelfExtend(G, W).farthest(n) == max(pos(i, j) for i in range(n) for j in range(i + 1))


@pytest.mark.parametrize(("L", "G", "W"), [(256, 4, 16), (8192, 8, 2048), (4096, 3, 1000)])
def test_the_capacity_is_the_longest_text_whose_farthest_position_fits(L: int, G: int, W: int) -> None:
    se = SelfExtend(G, W)
    n = se.capacity(L)
    assert se.farthest(n) <= L - 1 < se.farthest(n + G)


def test_no_self_extend_when_the_text_fits() -> None:
    assert choose(8192, 8192) is None


@pytest.mark.parametrize(("L", "W"), [(8192, 2048), (32768, 8192), (4096, 1024), (2048, 512), (6000, 1024),
                                      (256, 64), (8, 2)])
def test_auto_window_is_a_quarter_of_the_trained_window_as_a_power_of_two(L: int, W: int) -> None:
    assert auto_window(L) == W


@pytest.mark.parametrize("n_needed", [8193, 9680, 12000, 16394, 16896, 21600, 24576, 32778, 65536, 200000])
def test_choice_is_the_smallest_power_of_two_group_within_two_thirds_of_the_window(n_needed: int) -> None:
    L = 8192
    got = choose(L, n_needed)
    assert got is not None and got.ga_w == 2048 and got.capacity(L) >= n_needed
    assert got.farthest(n_needed) < L * 2 / 3
    assert got.ga_n == 2 or SelfExtend(got.ga_n // 2, 2048).farthest(n_needed) >= L * 2 / 3
    assert got.ga_n & (got.ga_n - 1) == 0


def test_the_smollm2_cells_where_the_old_choice_lost_get_the_setting_that_won_them() -> None:
    # docs/RESULTS.md, "Choosing G and W": G=8 W=2048 answered 16K (3 depths x 3 trials) and found the 21.6K key
    # where the earlier choices G=4 W=1024 and G=4 W=64 missed
    for n in (16394, 21600):
        assert choose(8192, n) == SelfExtend(8, 2048)


def test_a_small_change_in_length_never_moves_the_window() -> None:
    for L in (4096, 8192, 32768):
        windows = {choose(L, n).ga_w for n in range(L + 1, 20 * L, L // 16)}  # type: ignore[union-attr]
        assert windows == {auto_window(L)}


def test_impossible_lengths_fail_clearly() -> None:
    with pytest.raises(CapacityError, match="shorten the text"):
        choose(256, 10**7)


def test_plan_takes_the_given_setting_or_the_automatic_one() -> None:
    assert plan(8192, 16000, ga_n=4, ga_w=512) == SelfExtend(4, 512)
    assert plan(8192, 16000, ga_n=4) == SelfExtend(4, 2048)  # W defaults to the automatic window
    assert plan(8192, 16000, auto=True) == choose(8192, 16000)
    assert plan(8192, 4000, auto=True) == SelfExtend()  # fits: off
    assert plan(8192, 4000) == SelfExtend() == plan(8192, 4000, ga_n=1, ga_w=512)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"auto": True, "ga_n": 4}, "auto chooses G and W itself"),
    ({"auto": True, "ga_w": 512}, "auto chooses G and W itself"),
    ({"ga_w": 512}, "ga_w needs ga_n"),
    ({"ga_n": 0}, "ga_n must be an integer >= 1"),
    ({"ga_n": 4, "ga_w": 0}, "ga_w must be an integer >= 1"),
])
def test_plan_refuses_conflicting_or_invalid_requests_before_any_model(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        check_request(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=message):
        plan(8192, 16000, **kwargs)  # type: ignore[arg-type]


def test_plan_checks_the_capacity() -> None:
    with pytest.raises(CapacityError, match="60000 tokens exceed the capacity"):
        plan(8192, 60000, ga_n=4, ga_w=512)


def test_a_context_that_cannot_fit_this_machine_is_refused_before_llama_cpp_allocates_it() -> None:
    from selfext_cpp.models import ModelMeta

    # SmolLM2-135M's shape: 30 layers, 3 KV heads of 64 dims: 23,040 bytes of f16 K and V per cell, plus bookkeeping
    meta = ModelMeta(path="m.gguf", architecture="llama", name=None, n_ctx_train=8192, rope_type="norm",
                     rope_freq_base=None, n_layer=30, n_head=9, n_head_kv=3, n_embd=576, n_embd_head_k=64,
                     n_embd_head_v=64, n_vocab=49152, file_size=1, self_extend_supported=True, self_extend_status="ok",
                     has_chat_template=False)
    per_cell = 30 * 3 * 128 * 2 + engine.KV_CELL_HOST_BYTES
    have = engine.machine_memory(gpu=False)
    assert have > 2**30 and engine.machine_memory(gpu=True) >= have  # plus the GPUs' (none in a CPU build)
    fits = have // per_cell
    engine.check_context_memory(meta, fits)
    with pytest.raises(ParameterError, match=r"a context of \d+ tokens needs about [\d.]+ GiB for the KV cache, more "
                                             r"than this machine's [\d.]+ GiB of memory: lower n_ctx"):
        engine.check_context_memory(meta, fits + 1)
    engine.check_context_memory(meta, fits + 1, rpc=True)  # remote memory: not judged here


@pytest.mark.parametrize("keys", ["rows", "", "STEPS", 1])
def test_an_unknown_form_of_the_grouped_keys_is_refused_before_any_model(keys: object, tmp_path) -> None:
    with pytest.raises(ParameterError, match=r"^ga_keys is one of auto, steps, table, cache, not "):
        engine.load(tmp_path / "never-read.gguf", ga_n=4, ga_w=16, ga_keys=keys)  # type: ignore[arg-type]
    assert [engine.check_keys(k) for k in engine.KEYS_FORMS] == [0, 1, 2, 3]  # the C enum's values
