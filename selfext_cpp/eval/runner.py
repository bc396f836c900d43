"""Decoding on a ``Llama``'s context with explicit positions: the one loop every harness shares.

``Llama.eval`` always places tokens at consecutive positions; the ``shift`` baseline must place them where
llama.cpp's group-attention loop says, so all modes go through this thin layer over ``llama_decode``. Tokens
of one sequence (seq 0) are decoded in chunks of at most ``n_batch``; logits are copied out only where asked.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SelfextError
from .shift import GroupShift

if TYPE_CHECKING:
    from llama_cpp import Llama


class DecodeError(SelfextError):
    """llama_decode failed (usually: the context is too small for the prompt)."""


class Runner:
    """Seq 0 of ``llm``'s context, decoded at positions we choose. ``close()`` hands the context back empty."""

    def __init__(self, llm: Llama, n_batch: int | None = None) -> None:
        from .._lib import load_llama_cpp

        self.llm = llm
        self._ll: Any = load_llama_cpp().llama_cpp
        self.n_batch = min(n_batch or llm.n_batch, llm.n_batch)
        self.n_vocab = llm.n_vocab()
        self._batch: Any = self._ll.llama_batch_init(self.n_batch, 0, 1)
        self.clear()

    @property
    def memory(self) -> Any:
        return self._ll.llama_get_memory(self.llm.ctx)

    def clear(self) -> None:
        """Empty the KV cache (and tell ``Llama`` that nothing is cached)."""
        self._ll.llama_memory_clear(self.memory, True)
        self.llm.reset()

    def close(self) -> None:
        if self._batch is not None:
            self.clear()
            self._ll.llama_batch_free(self._batch)
            self._batch = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- positions in the cache ----------------------------------------------------------------------------

    def pos_max(self) -> int:
        """Largest position cached for seq 0 (-1 when empty)."""
        return int(self._ll.llama_memory_seq_pos_max(self.memory, 0))

    def pos_min(self) -> int:
        return int(self._ll.llama_memory_seq_pos_min(self.memory, 0))

    def seq_add(self, p0: int, p1: int, delta: int) -> None:
        self._ll.llama_memory_seq_add(self.memory, 0, p0, p1, delta)

    def seq_div(self, p0: int, p1: int, d: int) -> None:
        self._ll.llama_memory_seq_div(self.memory, 0, p0, p1, d)

    def seq_div_exact(self, p0: int, p1: int, d: int) -> None:
        """What seq_div means to do, with keys rotated the right way: one seq_add per position, ascending, so a
        moved cell (p -> p // d <= p) lands where the loop has already been and is not moved twice."""
        for p in range(max(p0, 0), p1):
            if p // d != p:
                self._ll.llama_memory_seq_add(self.memory, 0, p, p + 1, p // d - p)

    def seq_rm(self, p0: int, p1: int = -1) -> None:
        self._ll.llama_memory_seq_rm(self.memory, 0, p0, p1)

    # -- decoding --------------------------------------------------------------------------------------------

    def decode(self, tokens: Sequence[int], positions: Sequence[int], want: Sequence[bool] | None = None
               ) -> np.ndarray:
        """One llama_decode of at most n_batch tokens; returns the logits of the tokens flagged in ``want``
        (default: the last one) as float32 [n_wanted, n_vocab]."""
        n = len(tokens)
        if not 0 < n <= self.n_batch or len(positions) != n:
            raise ValueError(f"need 1..{self.n_batch} tokens, one position each")
        want = [False] * (n - 1) + [True] if want is None else list(want)
        b = self._batch
        b.n_tokens = n
        for i in range(n):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tokens[i], positions[i], 1, want[i]
            b.seq_id[i][0] = 0
        rc = self._ll.llama_decode(self.llm.ctx, b)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc} after {self.pos_max() + 1} cached positions: "
                              "the context is too small; lower the lengths")
        n_out = sum(bool(w) for w in want)
        if n_out == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = ctypes.cast(self._ll.llama_get_logits(self.llm.ctx), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()


class Sequence0:
    """A sequence being fed through a Runner: plain consecutive positions, or llama.cpp's group shifting.

    ``feed`` decodes tokens in chunks (calling ``shift.before_decode`` first, like llama.cpp's completion tool
    does before every batch) and returns the logits of the tokens at index >= ``logits_from`` of this call.
    """

    def __init__(self, runner: Runner, shift: GroupShift | None = None) -> None:
        self.runner = runner
        self.shift = shift
        self.n_past = 0  # next position; with shifting, in compressed coordinates
        self.tokens: list[int] = []  # tokens fed so far, in order

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def rewind(self, n: int) -> None:
        """Keep only the first ``n`` tokens fed (their cells stay cached); plain positions only."""
        if self.shift is not None:
            raise ValueError("a shifted sequence cannot be rewound: its cells no longer sit at token positions")
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"cannot keep {n} of {len(self.tokens)} tokens")
        self.runner.seq_rm(n)
        del self.tokens[n:]
        self.n_past = n

    def feed(self, tokens: Sequence[int], logits_from: int | None = None,
             on_chunk: Callable[[int], None] | None = None) -> np.ndarray:
        """Decode ``tokens``; logits of tokens[logits_from:] (default: of the last token only)."""
        start = len(tokens) - 1 if logits_from is None else logits_from
        out: list[np.ndarray] = []
        step = self.runner.n_batch
        for i in range(0, len(tokens), step):
            part = tokens[i:i + step]
            if self.shift is not None:
                self.n_past = self.shift.before_decode(self.n_past, self.runner)
            pos = list(range(self.n_past, self.n_past + len(part)))
            want = [i + j >= start for j in range(len(part))]
            out.append(self.runner.decode(part, pos, want))
            self.n_past += len(part)
            self.tokens.extend(part)
            if on_chunk is not None:
                on_chunk(len(part))
        return np.concatenate(out) if out else np.empty((0, self.runner.n_vocab), dtype=np.float32)

    def greedy(self, first_logits: np.ndarray, n_predict: int, stop: Callable[[int], bool]) -> list[int]:
        """Up to n_predict argmax tokens after ``first_logits``; stops after a token for which ``stop`` is true."""
        out: list[int] = []
        logits = first_logits
        for _ in range(n_predict):
            tok = int(np.argmax(logits))
            out.append(tok)
            if stop(tok) or len(out) == n_predict:
                break
            logits = self.feed([tok])[-1]
        return out


def log_softmax_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood (float64) of targets[i] under logits[i]."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x).sum(axis=-1))
    return lse - x[np.arange(len(targets)), np.asarray(targets)]
