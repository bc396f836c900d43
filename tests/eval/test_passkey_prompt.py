"""Passkey prompts (length, key depth), keys, scoring and option parsing: pure Python, a character tokenizer."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from selfext_cpp.errors import ParameterError
from selfext_cpp.eval.modes import Setting, parse_modes, setting
from selfext_cpp.eval.parsing import parse_depths, parse_size, parse_sizes
from selfext_cpp.eval.passkey import accuracy, build_prompt, largest_fitting, plan_trials, prompt_text, score
from selfext_cpp.eval.texts import PASSKEY_PREFIX, PASSKEY_QUESTION, PASSKEY_SENTENCE, filler_units
from selfext_cpp import SelfExtend


def chars(text: str) -> list[int]:
    """One token per character, plus a BOS."""
    return [1] + [ord(c) for c in text]


UNITS = filler_units("repeat")


def test_repeat_haystack_is_llama_cpp_passkey_filler() -> None:
    assert UNITS == ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                     "There and back again."]


@pytest.mark.parametrize("n_tokens", [400, 1000, 4096])
def test_prompt_is_the_longest_that_fits(n_tokens: int) -> None:
    p = build_prompt(chars, n_tokens, 0.5, "12345", UNITS)
    assert len(p.tokens) <= n_tokens
    assert len(chars(prompt_text(UNITS, p.n_filler + 1, 0.5, "12345")[1])) > n_tokens


def test_a_long_prompt_takes_a_handful_of_tokenizations() -> None:
    calls = []

    def counting(text: str) -> list[int]:
        calls.append(len(text))
        return chars(text)

    p = build_prompt(counting, 131072, 0.5, "12345", UNITS)
    assert len(p.tokens) <= 131072 < len(chars(prompt_text(UNITS, p.n_filler + 1, 0.5, "12345")[1]))
    assert len(calls) <= 10  # bisection: about 2 * log2(7000 sentences) = 26 tokenizations of up to 131K characters


@pytest.mark.parametrize("size", [
    lambda n: 7 + n * n // 50 + n,  # convex
    lambda n: 7 + 30 * math.isqrt(n),  # concave
    lambda n: 7 + n // 100 * 100,  # plateaus
    lambda n: 7 + 3 * n,  # linear
], ids=["convex", "concave", "plateaus", "linear"])
@pytest.mark.parametrize("answer", [0, 1, 2, 99, 100, 4321, 19999])
def test_largest_fitting_is_exact_for_any_non_decreasing_size(size: Callable[[int], int], answer: int) -> None:
    limit = size(answer)
    n = largest_fitting(size, limit)
    assert size(n) <= limit < size(n + 1)


def test_prompt_reads_like_llama_cpp_passkey() -> None:
    p = build_prompt(chars, 600, 0.0, "12345", UNITS)
    text = "".join(map(chr, p.tokens[1:]))
    assert text.startswith(PASSKEY_PREFIX + " " + PASSKEY_SENTENCE.format(key="12345") + " The grass is green.")
    assert text.endswith("." + PASSKEY_QUESTION)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_is_inserted_after_the_requested_share_of_the_filler(depth: float) -> None:
    p = build_prompt(chars, 2000, depth, "54321", UNITS)
    text = "".join(map(chr, p.tokens[1:]))
    before = text[len(PASSKEY_PREFIX):text.index("The pass key is 54321")]
    n_before = sum(before.count(u) for u in UNITS)
    assert n_before == round(depth * p.n_filler)
    # key_position: the first token after the text before the key (a BPE tokenizer's " The"; here the space)
    assert "".join(map(chr, p.tokens[p.key_position:])).startswith(" The pass key is 54321.")
    filler_chars = len(text) - len(PASSKEY_PREFIX) - len(PASSKEY_SENTENCE.format(key="54321")) - len(PASSKEY_QUESTION)
    assert abs(len(before) / filler_chars - depth) < 0.02  # a sentence is ~1 % of 2000 characters


def test_too_short_a_length_is_a_parameter_error() -> None:
    with pytest.raises(ParameterError, match="at least"):
        build_prompt(chars, 50, 0.5, "12345", UNITS)


def test_trials_have_seeded_five_digit_keys() -> None:
    a = plan_trials([100, 200], [0.1, 0.9], 3, seed=7)
    assert len(a) == 12
    assert a == plan_trials([100, 200], [0.1, 0.9], 3, seed=7)
    assert a != plan_trials([100, 200], [0.1, 0.9], 3, seed=8)
    assert all(len(t.key) == 5 and t.key.isdigit() for t in a)
    assert len({t.key for t in a}) > 1
    assert [(t.length, t.depth, t.trial) for t in a[:4]] == [(100, 0.1, 0), (100, 0.1, 1), (100, 0.1, 2),
                                                             (100, 0.9, 0)]


@pytest.mark.parametrize("output, correct", [
    (" 12345. Remember it.", True),
    ("12345", True),
    (" The pass key is 12345", True),
    (" 123456.", False),
    (" 1234", False),
    (" 12 345", False),
    (" the grass is green", False),
])
def test_score_wants_the_key_as_a_whole_number(output: str, correct: bool) -> None:
    assert score(output, "12345") is correct


def test_accuracy_per_mode_length_depth() -> None:
    from selfext_cpp.eval.passkey import TrialResult

    def r(mode: str, depth: float, ok: bool) -> TrialResult:
        return TrialResult(mode, 100, 99, depth, 0, "12345", 10, "", ok, 1, 0, 1.0, 0.1)

    rows = accuracy([r("vanilla", 0.1, True), r("vanilla", 0.1, False), r("selfext", 0.1, True)])
    assert rows == [{"mode": "vanilla", "length": 100, "depth": 0.1, "correct": 1, "trials": 2, "accuracy": 0.5},
                    {"mode": "selfext", "length": 100, "depth": 0.1, "correct": 1, "trials": 1, "accuracy": 1.0}]


def test_option_parsing() -> None:
    assert parse_sizes("4k,8K,2000,4k") == [4096, 8192, 2000]
    assert parse_size("1.5k") == 1536
    assert parse_sizes("0,4k", allow_zero=True) == [0, 4096]
    assert parse_depths("10,50,90") == [0.1, 0.5, 0.9]
    assert parse_modes("vanilla, selfext,shift") == ("vanilla", "selfext", "shift")
    for bad in (lambda: parse_sizes("4q"), lambda: parse_sizes("0"), lambda: parse_depths("150"),
                lambda: parse_modes("vanilla,rope")):
        with pytest.raises(ParameterError):
            bad()


def test_mode_settings() -> None:
    assert setting("vanilla", 8192, 32768) == Setting("vanilla")
    assert setting("selfext", 8192, 4096) == Setting("selfext")  # fits: nothing to extend
    assert setting("selfext", 8192, 16400) == Setting("selfext", 8, 2048)  # --auto's choice
    assert setting("shift", 8192, 32800) == Setting("shift", 16, 2048)
    assert setting("selfext", 8192, 32800, SelfExtend(8, 512)) == Setting("selfext", 8, 512)
    yarn = setting("yarn", 8192, 32768)
    assert yarn.rope_factor == 4.0
    assert yarn.llama_kwargs(8192) == {"rope_scaling_type": 2, "rope_freq_scale": 0.25, "yarn_orig_ctx": 8192}
    assert setting("linear", 8192, 16384).llama_kwargs(8192) == {"rope_scaling_type": 1, "rope_freq_scale": 0.5}
    assert setting("linear", 8192, 4096).llama_kwargs(8192) == {}  # fits: no scaling
    with pytest.raises(ParameterError, match="multiple of ga_n"):
        setting("shift", 8192, 32800, SelfExtend(3, 512))
