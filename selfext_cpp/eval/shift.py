"""The ``shift`` baseline: llama.cpp's approximate Self-Extend, by rewriting cached positions block by block.

This reproduces the loop of llama.cpp's completion tool (tools/completion/completion.cpp, ``--grp-attn-n G
--grp-attn-w W``; examples/passkey does the same with W = n_batch). Before every llama_decode, while the
cache holds a full ungrouped block of W positions, it runs (ga_i: where the ungrouped tail starts, in
compressed coordinates; ib = G·ga_i/W: blocks already grouped; bd = (W/G)·(G-1); dd = W/G - ib·bd - W)::

    llama_memory_seq_add(mem, 0, ga_i,              n_past,           ib*bd)  # undo the previous compression
    llama_memory_seq_div(mem, 0, ga_i + ib*bd,      ga_i + ib*bd + W, G)      # group the next block
    llama_memory_seq_add(mem, 0, ga_i + ib*bd + W,  n_past + ib*bd,   dd)     # pull the tail after it
    n_past -= bd; ga_i += W/G

After k such steps, the token at index j sits at position j // G if j < k·W, else j - k·bd: the first k
blocks are grouped (a floor division, like Self-Extend's), the rest keeps its order shifted down. The
difference from exact Self-Extend: keys are moved once and for all, so every query, near or far, sees the
same grouped positions; the "neighbour window" is whatever tail has not been grouped yet (between 0 and
W + n_batch tokens, not the last W), and tokens inside one batch attend with plain positions. Self-Extend
must be OFF on a context used this way.

A bug in the pinned llama.cpp: ``llama_memory_seq_div`` records the pending K-shift of each cell with the
wrong sign (``shift += p_old - p_new`` in llama_kv_cells::pos_div, where pos_add records ``p_new - p_old``),
so a divided cell keeps the position p_new for masking while its key is rotated to 2·p_old - p_new.
``exact_div=True`` (mode ``shift``) divides with one ``llama_memory_seq_add`` per position instead, which
leaves keys where the arithmetic above says; ``exact_div=False`` (mode ``shift-upstream``) calls
``llama_memory_seq_div`` as llama.cpp's tools do, bug included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ..errors import ParameterError


class Op(NamedTuple):
    """One cache rewrite: kind "add" (value = delta) or "div" (value = divisor), on positions [p0, p1)."""

    kind: str
    p0: int
    p1: int
    value: int


class PositionCache(Protocol):
    def seq_add(self, p0: int, p1: int, delta: int) -> None: ...

    def seq_div(self, p0: int, p1: int, d: int) -> None: ...

    def seq_div_exact(self, p0: int, p1: int, d: int) -> None: ...


def check_params(ga_n: int, ga_w: int) -> None:
    """llama.cpp's own asserts on --grp-attn-n/--grp-attn-w, as a ParameterError."""
    if ga_n < 1:
        raise ParameterError(f"shift mode needs {{ga_n}} >= 1, got {ga_n}")
    if ga_n > 1 and (ga_w < ga_n or ga_w % ga_n):
        raise ParameterError(f"shift mode (llama.cpp's group attention) needs {{ga_w}} to be a multiple of {{ga_n}}; "
                             f"got G={ga_n}, W={ga_w}: try {{ga_w}} {max(ga_n, ga_w - ga_w % ga_n)}")


def shift_window(ga_n: int, ga_w: int) -> int:
    """The largest W' <= W that llama.cpp accepts with G (a multiple of G); used when --auto picks W."""
    if ga_n <= 1:
        return ga_w
    return max(ga_n, ga_w - ga_w % ga_n)


@dataclass
class GroupShift:
    """State of llama.cpp's group-attention loop over one sequence (G = ga_n, W = ga_w)."""

    ga_n: int
    ga_w: int
    exact_div: bool = True  # divide by per-position seq_add (see the module docstring) or by seq_div
    ga_i: int = 0  # start of the ungrouped tail, in compressed positions
    steps: int = 0  # blocks grouped so far (k)

    def __post_init__(self) -> None:
        check_params(self.ga_n, self.ga_w)

    def plan(self, n_past: int) -> tuple[list[Op], int]:
        """The rewrites llama.cpp issues before decoding at compressed position ``n_past``, and the new n_past.

        Advances the state; pure arithmetic (no cache needed).
        """
        ops: list[Op] = []
        if self.ga_n == 1:
            return ops, n_past
        g, w = self.ga_n, self.ga_w
        while n_past >= self.ga_i + w:
            ib = (g * self.ga_i) // w
            bd = (w // g) * (g - 1)
            dd = (w // g) - ib * bd - w
            ops += [Op("add", self.ga_i, n_past, ib * bd),
                    Op("div", self.ga_i + ib * bd, self.ga_i + ib * bd + w, g),
                    Op("add", self.ga_i + ib * bd + w, n_past + ib * bd, dd)]
            n_past -= bd
            self.ga_i += w // g
            self.steps += 1
        return ops, n_past

    def before_decode(self, n_past: int, cache: PositionCache) -> int:
        """Apply the rewrites due before the next llama_decode to ``cache``; returns the new n_past."""
        ops, n_past = self.plan(n_past)
        for op in ops:
            if op.kind == "add":
                if op.value:
                    cache.seq_add(op.p0, op.p1, op.value)
            elif self.exact_div:
                cache.seq_div_exact(op.p0, op.p1, op.value)
            else:
                cache.seq_div(op.p0, op.p1, op.value)
        return n_past


def apply_ops(positions: list[int], ops: list[Op]) -> list[int]:
    """What llama_memory_seq_add/seq_div do to the cells of one sequence, on a list of positions."""
    out = list(positions)
    for op in ops:
        for i, p in enumerate(out):
            if op.p0 <= p < op.p1:
                out[i] = p + op.value if op.kind == "add" else p // op.value
    return out


def grouped_blocks(n_tokens: int, ga_n: int, ga_w: int, n_batch: int) -> int:
    """k: blocks grouped once ``n_tokens`` were decoded in batches of ``n_batch`` (checks come before each
    batch, so the last check saw n_batch·floor((n_tokens - 1)/n_batch) tokens)."""
    if ga_n == 1 or n_tokens <= 0:
        return 0
    return (n_batch * ((n_tokens - 1) // n_batch)) // ga_w


def shifted_positions(n_tokens: int, ga_n: int, ga_w: int, n_batch: int) -> list[int]:
    """Closed form of the cache after the loop: position of token j is j // G for j < k·W, else j - k·bd."""
    k = grouped_blocks(n_tokens, ga_n, ga_w, n_batch)
    bd = (ga_w // ga_n) * (ga_n - 1) if ga_n > 1 else 0
    return [j // ga_n if j < k * ga_w else j - k * bd for j in range(n_tokens)]
