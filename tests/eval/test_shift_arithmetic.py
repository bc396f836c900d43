"""The `shift` baseline issues llama.cpp's group-attention rewrites, and they leave the documented positions."""

from __future__ import annotations

import pytest

from selfext_cpp.errors import ParameterError
from selfext_cpp.eval.shift import (GroupShift, Op, apply_ops, check_params, grouped_blocks, shift_window,
                                    shifted_positions)


def feed(n_tokens: int, ga_n: int, ga_w: int, n_batch: int) -> tuple[list[int], GroupShift, int]:
    """Emulate the completion tool's loop on a list of cell positions: shift before every batch, then decode."""
    gs = GroupShift(ga_n, ga_w)
    cells: list[int] = []
    n_past = 0
    for i in range(0, n_tokens, n_batch):
        ops, n_past = gs.plan(n_past)
        cells = apply_ops(cells, ops)
        part = min(n_batch, n_tokens - i)
        cells += list(range(n_past, n_past + part))
        n_past += part
    return cells, gs, n_past


def test_first_step_groups_one_window_and_pulls_the_tail_down() -> None:
    gs = GroupShift(2, 4)
    ops, n_past = gs.plan(6)  # 6 cached tokens at 0..5, W = 4: one block is due
    # ib = 0, bd = (4/2)·1 = 2, dd = 4/2 - 0 - 4 = -2
    assert ops == [Op("add", 0, 6, 0), Op("div", 0, 4, 2), Op("add", 4, 6, -2)]
    assert (n_past, gs.ga_i, gs.steps) == (4, 2, 1)
    assert apply_ops(list(range(6)), ops) == [0, 0, 1, 1, 2, 3]


def test_second_step_undoes_the_first_shift_before_grouping_the_next_block() -> None:
    gs = GroupShift(2, 4)
    cells = apply_ops(list(range(6)), gs.plan(6)[0]) + [4, 5, 6, 7]  # 4 more tokens decoded at 4..7
    ops, n_past = gs.plan(8)
    # ib = 1: the tail [2, 8) goes back up by bd = 2 (to the true positions 4..9), [4, 8) is divided by G,
    # and what follows (8, 9) comes down by dd = 2 - 2 - 4 = -4, i.e. to j - k·bd with k = 2
    assert ops == [Op("add", 2, 8, 2), Op("div", 4, 8, 2), Op("add", 8, 10, -4)]
    assert apply_ops(cells, ops) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]
    assert (n_past, gs.ga_i) == (6, 4)


def test_nothing_happens_before_a_full_window_is_cached() -> None:
    gs = GroupShift(4, 16)
    assert gs.plan(15) == ([], 15)
    assert gs.steps == 0


@pytest.mark.parametrize("ga_n, ga_w", [(2, 4), (4, 16), (3, 12), (8, 64), (7, 511)])
@pytest.mark.parametrize("n_batch", [1, 5, 16, 64, 512])
@pytest.mark.parametrize("n_tokens", [1, 17, 100, 1000])
def test_closed_form_matches_the_emulated_loop(ga_n: int, ga_w: int, n_batch: int, n_tokens: int) -> None:
    cells, gs, n_past = feed(n_tokens, ga_n, ga_w, n_batch)
    assert cells == shifted_positions(n_tokens, ga_n, ga_w, n_batch)
    assert gs.steps == grouped_blocks(n_tokens, ga_n, ga_w, n_batch)
    assert n_past == cells[-1] + 1


def test_closed_form_groups_by_floor_division_and_shifts_the_tail() -> None:
    # 40 tokens, G = 4, W = 8, batches of 10: the last check saw 30 tokens, so k = 3 blocks (24 tokens) grouped
    pos = shifted_positions(40, 4, 8, 10)
    assert grouped_blocks(40, 4, 8, 10) == 3
    assert pos[:24] == [j // 4 for j in range(24)]
    assert pos[24:] == [j - 3 * 6 for j in range(24, 40)]  # bd = (8/4)·3 = 6


def test_group_size_one_never_shifts() -> None:
    assert shifted_positions(100, 1, 0, 7) == list(range(100))
    assert GroupShift(1, 0).plan(1000) == ([], 1000)


def test_window_must_be_a_multiple_of_the_group_size_like_llama_cpp_asserts() -> None:
    with pytest.raises(ParameterError, match="multiple of ga_n.*try ga_w 510"):
        check_params(3, 512)
    check_params(4, 512)
    assert shift_window(7, 512) == 511
    assert shift_window(4, 512) == 512
