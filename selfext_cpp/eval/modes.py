"""The ways of reading a long prompt that the evaluations compare, and the contexts that run them.

vanilla  plain RoPE at the true positions, no scaling (fails past the trained context, as it should)
selfext  exact Self-Extend in libllama (G/W given, or chosen by ``engine.plan`` for the length needed)
shift    llama.cpp's approximation: cached positions rewritten block-wise (see shift.py); Self-Extend off
shift-upstream  the same with llama.cpp's own llama_memory_seq_div, whose K-shift sign bug it keeps
yarn     llama.cpp's YaRN RoPE scaling, factor = needed length / n_ctx_train, yarn_orig_ctx = n_ctx_train
linear   llama.cpp's linear RoPE scaling (position interpolation), rope_freq_scale = 1 / factor
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine import SelfExtend, enable_self_extend, plan
from ..errors import ParameterError
from .runner import Runner, Sequence0
from .shift import GroupShift, check_params, shift_window

if TYPE_CHECKING:
    from llama_cpp import Llama

MODES = ("vanilla", "selfext", "shift", "shift-upstream", "yarn", "linear")
SHIFT_MODES = ("shift", "shift-upstream")
ROPE_SCALING = {"linear": 1, "yarn": 2}  # llama_rope_scaling_type


@dataclass(frozen=True)
class Setting:
    """One mode at one length: what the context and the sequence are set to."""

    mode: str
    ga_n: int = 1
    ga_w: int = 0
    rope_factor: float = 1.0

    def context_key(self) -> tuple[Any, ...]:
        """Settings with equal keys can share one llama context (Self-Extend is switched on the live context)."""
        if self.mode in ROPE_SCALING and self.rope_factor > 1.0:
            return (self.mode, round(self.rope_factor, 6))
        return ("plain",)

    def llama_kwargs(self, n_ctx_train: int) -> dict[str, Any]:
        if self.mode in ROPE_SCALING and self.rope_factor > 1.0:
            kw: dict[str, Any] = {"rope_scaling_type": ROPE_SCALING[self.mode],
                                  "rope_freq_scale": 1.0 / self.rope_factor}
            if self.mode == "yarn":
                kw["yarn_orig_ctx"] = n_ctx_train
            return kw
        return {}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_modes(text: str) -> tuple[str, ...]:
    """"vanilla,selfext" -> ("vanilla", "selfext"); ParameterError on an unknown mode."""
    modes = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ParameterError(f"unknown mode {', '.join(bad) or '(none)'}: choose from {','.join(MODES)}")
    return modes


def self_extend_for(n_ctx_train: int, n_needed: int, ga: SelfExtend | None) -> SelfExtend:
    """The given G/W (checked against the trained window, not the length: a harness may probe past the
    capacity), else the automatic choice for ``n_needed`` (off when the text fits)."""
    if ga is not None:
        return plan(n_ctx_train, ga_n=ga.ga_n, ga_w=ga.ga_w)
    return plan(n_ctx_train, n_needed, auto=True)


def setting(mode: str, n_ctx_train: int, n_needed: int, ga: SelfExtend | None = None) -> Setting:
    """The Setting of ``mode`` for a sequence of ``n_needed`` tokens on a model trained on ``n_ctx_train``."""
    if mode == "vanilla":
        return Setting("vanilla")
    if mode == "selfext" or mode in SHIFT_MODES:
        se = self_extend_for(n_ctx_train, n_needed, ga)
        if not se.enabled:
            return Setting(mode)
        if mode in SHIFT_MODES:
            w = se.ga_w if ga is not None else shift_window(se.ga_n, se.ga_w)
            check_params(se.ga_n, w)
            return Setting(mode, se.ga_n, w)
        return Setting(mode, se.ga_n, se.ga_w)
    if mode in ROPE_SCALING:
        return Setting(mode, rope_factor=max(1.0, n_needed / n_ctx_train))
    raise ParameterError(f"unknown mode {mode!r}: choose from {','.join(MODES)}")


class Contexts:
    """Llama contexts for the settings met so far (at most ``keep`` alive), each with its Runner."""

    def __init__(self, model_path: str | Path, *, n_ctx: int, n_batch: int = 512, keep: int = 2,
                 **llama_kwargs: Any) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.keep = keep
        self.llama_kwargs = llama_kwargs
        self._open: OrderedDict[tuple[Any, ...], tuple[Llama, Runner]] = OrderedDict()
        self._last: dict[tuple[Any, ...], tuple[Setting, Sequence0]] = {}  # per context: its live sequence
        self._n_ctx_train: int | None = None

    @property
    def n_ctx_train(self) -> int:
        if self._n_ctx_train is None:
            from ..engine import n_ctx_train
            self._n_ctx_train = n_ctx_train(self._get(("plain",), {})[0])
        return self._n_ctx_train

    def llm(self) -> Llama:
        """The plain context's Llama (for tokenizing)."""
        return self._get(("plain",), {})[0]

    def _get(self, key: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Llama, Runner]:
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        while len(self._open) >= self.keep:
            old_key, (old_llm, old_runner) = self._open.popitem(last=False)
            self._last.pop(old_key, None)
            old_runner.close()
            old_llm.close()
        from ..engine import load
        llm = load(self.model_path, n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_batch,
                   **self.llama_kwargs, **kwargs)
        self._open[key] = (llm, Runner(llm))
        return self._open[key]

    def sequence(self, s: Setting) -> Sequence0:
        """An empty sequence on the context for ``s``, Self-Extend set for it (on only in selfext mode)."""
        llm, runner = self._get(s.context_key(), s.llama_kwargs(self.n_ctx_train))
        runner.clear()
        if s.mode == "selfext":
            enable_self_extend(llm, s.ga_n, s.ga_w, warn_slow=False)
        else:
            enable_self_extend(llm, 1, 0)
        shift = None
        if s.mode in SHIFT_MODES and s.ga_n > 1:
            shift = GroupShift(s.ga_n, s.ga_w, exact_div=s.mode == "shift")
        seq = Sequence0(runner, shift)
        self._last[s.context_key()] = (s, seq)
        return seq

    def resume(self, s: Setting, prompt: list[int]) -> Sequence0:
        """The sequence for ``s`` still holding the longest prefix of ``prompt`` that the last sequence of this
        setting cached (all but the prompt's last token at most, so that feeding the rest gives its logits).

        Cells past that prefix are removed, so the result is the prompt read from scratch, up to the rounding of
        other batch boundaries. A shifted sequence, or another setting since, gives an empty sequence.
        """
        last = self._last.get(s.context_key())
        if last is None or last[0] != s or last[1].shift is not None:
            return self.sequence(s)
        seq = last[1]
        self._open.move_to_end(s.context_key())  # most recently used (a context with a live sequence is open)
        seq.rewind(seq.runner.llm.longest_token_prefix(seq.tokens, prompt[:-1]))
        return seq

    def close(self) -> None:
        self._last.clear()
        while self._open:
            _, (llm, runner) = self._open.popitem()
            runner.close()
            llm.close()

    def __enter__(self) -> Contexts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
