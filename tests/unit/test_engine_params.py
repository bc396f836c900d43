"""Self-Extend parameters: validation, the paper's capacity, and the automatic choice (pure Python)."""

from __future__ import annotations

import math

import pytest

from selfext_cpp import CapacityError, ParameterError, SelfExtend, capacity, choose


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
    with pytest.raises(ParameterError, match=r"--ga-w 8192 must be smaller .* try --ga-w 2048"):
        SelfExtend(4, 8192).check(8192)


def test_text_beyond_capacity_names_it_and_a_setting_that_fits() -> None:
    with pytest.raises(CapacityError, match=r"40000 tokens exceed the capacity 31232 .* try --ga-n \d+ --ga-w \d+"):
        SelfExtend(4, 512).check(8192, 40000)


def test_no_self_extend_when_the_text_fits() -> None:
    assert choose(8192, 8192) is None


@pytest.mark.parametrize("n_needed", [8193, 12000, 16896, 24576, 32768, 65536, 200000])
def test_choice_is_the_smallest_group_within_two_thirds_of_the_window(n_needed: int) -> None:
    L = 8192
    got = choose(L, n_needed)
    assert got is not None and got.capacity(L) >= n_needed
    assert got.ga_w + math.ceil((n_needed - got.ga_w) / got.ga_n) <= L * 2 / 3
    # no smaller group size has any allowed window
    for g in range(2, got.ga_n):
        for w in (1 << k for k in range(6, 13)):
            assert w + math.ceil((n_needed - w) / g) > L * 2 / 3


def test_impossible_lengths_fail_clearly() -> None:
    with pytest.raises(CapacityError, match="shorten the text"):
        choose(256, 10**7)
