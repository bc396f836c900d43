"""Passkey retrieval: a random key hidden at a chosen depth of a haystack of N tokens, read back greedily.

The prompt follows llama.cpp's examples/passkey: a fixed prefix, filler sentences with the key sentence
inserted after ``depth`` of them (as a fraction of the filler), and the question "The pass key is". A trial
is correct when a run of digits in the greedy continuation equals the key.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine import SelfExtend
from ..errors import ParameterError
from .modes import Contexts, Setting, setting
from .texts import PASSKEY_PREFIX, PASSKEY_QUESTION, PASSKEY_SENTENCE, filler_units

Tokenize = Callable[[str], list[int]]
KEY_DIGITS = 5


@dataclass(frozen=True)
class PasskeyPrompt:
    tokens: list[int]
    key: str
    depth: float  # requested: share of the filler sentences before the key
    key_position: int  # index of the key sentence's first token in ``tokens``
    n_filler: int  # filler sentences in the prompt

    @property
    def key_depth(self) -> float:
        """Where the key sentence starts, as a share of the prompt's tokens."""
        return self.key_position / len(self.tokens)


def prompt_text(units: Sequence[str], n_units: int, depth: float, key: str) -> tuple[str, str]:
    """(text before the key sentence, whole prompt) with ``n_units`` filler sentences cycled from ``units``."""
    filler = [units[i % len(units)] for i in range(n_units)]
    cut = round(depth * n_units)
    head = " ".join([PASSKEY_PREFIX, *filler[:cut]])
    tail = " ".join([PASSKEY_SENTENCE.format(key=key), *filler[cut:]])
    return head, f"{head} {tail}{PASSKEY_QUESTION}"


def largest_fitting(size: Callable[[int], int], limit: int) -> int:
    """The largest n >= 0 with size(n) <= limit, for a non-decreasing ``size`` with size(0) <= limit.

    A prompt's size grows almost linearly with its filler sentences, so each guess extrapolates (then
    interpolates) from the sizes measured so far: a handful of calls where bisection takes 2·log2(n), which
    counts when every call tokenizes a 128K-token text. A guess that does not halve the bracket is followed by
    a bisection step, so the worst case stays logarithmic.
    """
    s0 = size(0)
    lo, s_lo = 0, s0  # size(lo) <= limit
    hi, s_hi = -1, 0  # size(hi) > limit once hi >= 0
    guess, bisect = 1, False
    while hi < 0 or hi - lo > 1:
        width = hi - lo
        s = size(guess)
        if s <= limit:
            lo, s_lo = guess, s
        else:
            hi, s_hi = guess, s
        if hi < 0:  # extrapolate at the mean growth so far, aiming one token past the limit
            rate = max((s_lo - s0) / lo, 1e-3)
            guess = lo + max(1, math.ceil((limit + 1 - s_lo) / rate))
        elif hi - lo > 1:
            if bisect:
                guess = (lo + hi) // 2
            else:
                guess = lo + (limit - s_lo) * (hi - lo) // max(s_hi - s_lo, 1)
                guess = min(max(guess, lo + 1), hi - 1)
            bisect = width > 0 and 2 * (hi - lo) > width  # this step did not halve the bracket
    return lo


def build_prompt(tokenize: Tokenize, n_tokens: int, depth: float, key: str, units: Sequence[str]) -> PasskeyPrompt:
    """The longest prompt of at most ``n_tokens`` tokens (counted as the model tokenizes it, BOS included)."""
    if not 0.0 <= depth <= 1.0:
        raise ParameterError(f"depth must be between 0 and 100 %, got {depth * 100:g} %")

    def size(n: int) -> int:
        return len(tokenize(prompt_text(units, n, depth, key)[1]))

    if size(0) > n_tokens:
        raise ParameterError(f"a passkey prompt needs at least {size(0)} tokens; {n_tokens} is too short")
    n = largest_fitting(size, n_tokens)
    head, text = prompt_text(units, n, depth, key)
    tokens = tokenize(text)
    return PasskeyPrompt(tokens, key, depth, key_position=len(tokenize(head)), n_filler=n)


def score(output: str, key: str) -> bool:
    """True when a maximal run of digits in ``output`` equals ``key`` ("12345." yes, "123456" no)."""
    return key in re.findall(r"\d+", output)


@dataclass(frozen=True)
class Trial:
    length: int
    depth: float
    trial: int
    key: str


def plan_trials(lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int) -> list[Trial]:
    """Every (length, depth, trial), each with its own random key; the same seed gives the same keys."""
    rng = random.Random(seed)
    lo = 10 ** (KEY_DIGITS - 1)
    return [Trial(n, d, t, str(rng.randrange(lo, 10 * lo))) for n in lengths for d in depths for t in range(trials)]


@dataclass
class TrialResult:
    mode: str
    length: int  # requested prompt length in tokens
    n_tokens: int  # actual prompt tokens
    depth: float
    trial: int
    key: str
    key_position: int
    output: str
    correct: bool
    ga_n: int
    ga_w: int
    rope_factor: float
    seconds: float  # decoding this prompt's tokens past ``reused`` and the answer
    reused: int = 0  # prompt tokens still cached from the previous trial (the text before the key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PasskeyConfig:
    lengths: Sequence[int]
    depths: Sequence[float] = (0.1, 0.5, 0.9)
    trials: int = 3
    modes: Sequence[str] = ("vanilla", "selfext", "shift")
    seed: int = 0
    haystack: str = "repeat"
    ga: SelfExtend | None = None  # None: choose G/W per length
    n_predict: int = 10
    n_batch: int = 512
    llama_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"lengths": list(self.lengths), "depths": list(self.depths), "trials": self.trials,
                "modes": list(self.modes), "seed": self.seed, "haystack": self.haystack,
                "ga_n": self.ga.ga_n if self.ga else None, "ga_w": self.ga.ga_w if self.ga else None,
                "auto": self.ga is None, "n_predict": self.n_predict, "n_batch": self.n_batch}


class PasskeyRun:
    """A passkey evaluation: ``settings`` and ``total_tokens`` are known before ``run()`` starts decoding."""

    def __init__(self, model_path: str | Path, config: PasskeyConfig) -> None:
        if not config.lengths or not config.depths or config.trials < 1:
            raise ParameterError("need at least one length, one depth and one trial")
        self.config = config
        self.contexts = Contexts(model_path, n_ctx=max(config.lengths) + config.n_predict + 8,
                                 n_batch=config.n_batch, **config.llama_kwargs)
        self.n_ctx_train = self.contexts.n_ctx_train
        self.trials = plan_trials(config.lengths, config.depths, config.trials, config.seed)
        self.settings: dict[tuple[str, int], Setting] = {
            (m, n): setting(m, self.n_ctx_train, n + config.n_predict, config.ga)
            for n in config.lengths for m in config.modes}
        self.total_tokens = sum(config.lengths) * len(config.depths) * config.trials * len(config.modes)

    def run(self, on_tokens: Callable[[int], None] | None = None,
            on_start: Callable[[Setting, Trial], None] | None = None) -> Iterator[TrialResult]:
        """Yield one TrialResult per (mode, trial), lengths in order; KeyboardInterrupt stops between chunks."""
        cfg = self.config
        units = filler_units(cfg.haystack)
        for n in cfg.lengths:
            llm = self.contexts.llm()  # contexts come and go (at most ``keep`` alive): never hold one

            def tokenize(text: str) -> list[int]:
                return llm.tokenize(text.encode(), add_bos=True, special=False)

            trials = [t for t in self.trials if t.length == n]
            prompts = [build_prompt(tokenize, n, t.depth, t.key, units) for t in trials]
            for mode in cfg.modes:
                s = self.settings[(mode, n)]
                for t, p in zip(trials, prompts):
                    if on_start is not None:
                        on_start(s, t)
                    t0 = time.perf_counter()
                    seq = self.contexts.resume(s, p.tokens)  # trials of one depth share the text before the key
                    reused = seq.n_tokens
                    if on_tokens is not None and reused:
                        on_tokens(reused)
                    logits = seq.feed(p.tokens[reused:], on_chunk=on_tokens)[-1]
                    eos = seq.runner.llm.token_eos()
                    out_tokens = seq.greedy(logits, cfg.n_predict, lambda tok: tok == eos)
                    output = seq.runner.llm.detokenize(out_tokens).decode("utf-8", errors="replace")
                    yield TrialResult(mode, n, len(p.tokens), t.depth, t.trial, t.key, p.key_position, output,
                                      score(output, t.key), s.ga_n, s.ga_w, s.rope_factor,
                                      round(time.perf_counter() - t0, 3), reused)

    def close(self) -> None:
        self.contexts.close()


def accuracy(results: Sequence[TrialResult]) -> list[dict[str, Any]]:
    """Accuracy per (mode, length, depth), in first-seen order."""
    cells: dict[tuple[str, int, float], list[bool]] = {}
    for r in results:
        cells.setdefault((r.mode, r.length, r.depth), []).append(r.correct)
    return [{"mode": m, "length": n, "depth": d, "correct": sum(v), "trials": len(v), "accuracy": sum(v) / len(v)}
            for (m, n, d), v in cells.items()]
