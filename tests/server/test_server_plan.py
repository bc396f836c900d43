"""engine.serving_plan: the Self-Extend setting and the per-request context that `selfext serve` serves."""

from __future__ import annotations

import pytest

from selfext_cpp import CapacityError, ParameterError, SelfExtend, choose
from selfext_cpp.engine import serving_plan as plan


def test_given_g_and_w_serve_their_whole_capacity() -> None:
    assert plan(64, ga_n=4, ga_w=16) == (SelfExtend(4, 16), 208)


def test_given_context_within_the_capacity_is_served() -> None:
    assert plan(64, ga_n=4, ga_w=16, n_ctx=100) == (SelfExtend(4, 16), 100)


def test_without_self_extend_the_trained_context_is_served() -> None:
    assert plan(64) == (SelfExtend(), 64)
    assert plan(64, ga_n=1, ga_w=512) == (SelfExtend(), 64)  # W means nothing without G


def test_auto_max_ctx_takes_g_and_w_from_choose() -> None:
    assert plan(4096, auto_max_ctx=16384) == (choose(4096, 16384), 16384)


def test_auto_max_ctx_within_the_trained_context_leaves_self_extend_off() -> None:
    assert plan(4096, auto_max_ctx=2048) == (SelfExtend(), 2048)


def test_context_beyond_the_capacity_is_refused() -> None:
    with pytest.raises(CapacityError, match="300 tokens exceed the capacity 208"):
        plan(64, ga_n=4, ga_w=16, n_ctx=300)


@pytest.mark.parametrize("kwargs", [{"ga_n": 4, "ga_w": 16, "auto_max_ctx": 300}, {"n_ctx": 100, "auto_max_ctx": 300}])
def test_auto_max_ctx_with_explicit_settings_is_a_usage_error(kwargs: dict[str, int]) -> None:
    with pytest.raises(ParameterError, match="not both"):
        plan(64, **kwargs)


def test_a_window_without_a_group_size_is_a_usage_error() -> None:
    with pytest.raises(ParameterError, match="ga_w needs ga_n"):
        plan(64, ga_w=16)
