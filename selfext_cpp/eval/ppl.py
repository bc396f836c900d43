"""Perplexity of one final window of a long text, read with growing context.

For a context length L, the model reads the L tokens that end at token T (T = the longest length asked, so
every length scores the *same* final ``window`` tokens) and we take the perplexity of those last ``window``
tokens. Without Self-Extend it explodes once L passes the trained context; with it, it should stay flat or
fall (more context helps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine import SelfExtend
from ..errors import ParameterError
from .modes import Contexts, Setting, setting
from .runner import log_softmax_nll


@dataclass
class PplConfig:
    lengths: Sequence[int]
    modes: Sequence[str] = ("vanilla", "selfext")
    window: int = 512
    ga: SelfExtend | None = None  # None: choose G/W per length
    n_batch: int = 512
    llama_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"lengths": list(self.lengths), "modes": list(self.modes), "window": self.window,
                "ga_n": self.ga.ga_n if self.ga else None, "ga_w": self.ga.ga_w if self.ga else None,
                "auto": self.ga is None, "n_batch": self.n_batch}


@dataclass
class PplResult:
    mode: str
    length: int
    window: int
    nll: float  # mean negative log-likelihood (nats/token) over the window
    ppl: float
    ga_n: int
    ga_w: int
    rope_factor: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def context_slices(n_text: int, lengths: Sequence[int], n_bos: int) -> dict[int, tuple[int, int]]:
    """For each length, the [start, end) slice of the text tokens it reads; all end at the same token."""
    end = max(lengths) - n_bos
    if end > n_text:
        raise ParameterError(f"the text has {n_text} tokens, fewer than the longest length {max(lengths)}: "
                             "use a longer {text} or shorter {lengths}")
    return {n: (end - (n - n_bos), end) for n in lengths}


class PplRun:
    """A perplexity evaluation over ``text``; ``settings`` and ``total_tokens`` are known before ``run()``."""

    def __init__(self, model_path: str | Path, text: str, config: PplConfig) -> None:
        if not config.lengths:
            raise ParameterError("need at least one length")
        if not 0 < config.window < min(config.lengths):
            raise ParameterError(f"{{window}} must be between 1 and the shortest length - 1, got {config.window}")
        self.config = config
        self.contexts = Contexts(model_path, n_ctx=max(config.lengths) + 8, n_batch=config.n_batch,
                                 **config.llama_kwargs)
        self.n_ctx_train = self.contexts.n_ctx_train
        llm = self.contexts.llm()
        self.bos = [llm.token_bos()] if llm.tokenize(b"a", add_bos=True)[:1] == [llm.token_bos()] else []
        self.text_tokens: list[int] = llm.tokenize(text.encode(), add_bos=False, special=False)
        self.slices = context_slices(len(self.text_tokens), config.lengths, len(self.bos))
        self.settings: dict[tuple[str, int], Setting] = {
            (m, n): setting(m, self.n_ctx_train, n, config.ga) for n in config.lengths for m in config.modes}
        self.total_tokens = sum(config.lengths) * len(config.modes)

    def run(self, on_tokens: Callable[[int], None] | None = None,
            on_start: Callable[[Setting, int], None] | None = None) -> Iterator[PplResult]:
        """Yield one PplResult per (length, mode)."""
        w = self.config.window
        for n in self.config.lengths:
            a, b = self.slices[n]
            tokens = self.bos + self.text_tokens[a:b]  # [n]
            for mode in self.config.modes:
                s = self.settings[(mode, n)]
                if on_start is not None:
                    on_start(s, n)
                t0 = time.perf_counter()
                seq = self.contexts.sequence(s)
                logits = seq.feed(tokens, logits_from=n - w - 1, on_chunk=on_tokens)[:w]  # predict tokens[n-w:]
                nll = float(np.mean(log_softmax_nll(logits, tokens[n - w:])))
                yield PplResult(mode, n, w, round(nll, 6), round(math.exp(nll), 4), s.ga_n, s.ga_w, s.rope_factor,
                                round(time.perf_counter() - t0, 3))

    def close(self) -> None:
        self.contexts.close()
