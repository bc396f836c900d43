"""Self-Extend on llama-cpp-python's ``Llama``: parameters, capacity, automatic choice, enabling."""

from __future__ import annotations

import codecs
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CapacityError, ModelError, ParameterError, UnsupportedModelError

if TYPE_CHECKING:
    from llama_cpp import Llama

# the authors advise keeping the farthest grouped position inside this share of the trained window
WELL_TRAINED_SHARE = 2 / 3
MAX_AUTO_GROUP = 64


@dataclass(frozen=True)
class SelfExtend:
    """Group size ``ga_n`` (G) and neighbour window ``ga_w`` (W); G == 1 means vanilla attention."""

    ga_n: int = 1
    ga_w: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ga_n, bool) or not isinstance(self.ga_n, int) or self.ga_n < 1:
            raise ParameterError(f"--ga-n must be an integer >= 1, got {self.ga_n!r}")
        if self.ga_n > 1 and (isinstance(self.ga_w, bool) or not isinstance(self.ga_w, int) or self.ga_w < 1):
            raise ParameterError(f"--ga-w must be an integer >= 1, got {self.ga_w!r}")

    @property
    def enabled(self) -> bool:
        return self.ga_n > 1

    def capacity(self, n_ctx_train: int) -> int:
        """Longest sequence whose farthest grouped distance stays inside the trained window: (L - W)·G + W."""
        if not self.enabled:
            return n_ctx_train
        return (n_ctx_train - self.ga_w) * self.ga_n + self.ga_w

    def check(self, n_ctx_train: int, n_needed: int | None = None) -> None:
        """Raise ParameterError/CapacityError when these parameters cannot serve ``n_needed`` tokens."""
        if self.enabled and self.ga_w >= n_ctx_train:
            raise ParameterError(f"--ga-w {self.ga_w} must be smaller than the model's trained context "
                                 f"({n_ctx_train}); try --ga-w {n_ctx_train // 4}")
        if n_needed is not None and n_needed > self.capacity(n_ctx_train):
            hint = choose(n_ctx_train, n_needed, strict=False)
            fix = f"; try --ga-n {hint.ga_n} --ga-w {hint.ga_w}" if hint else ""
            what = (f"the capacity {self.capacity(n_ctx_train)} of --ga-n {self.ga_n} --ga-w {self.ga_w} on a "
                    f"{n_ctx_train}-token model" if self.enabled else
                    f"the model's trained context ({n_ctx_train}), and Self-Extend is off")
            raise CapacityError(f"{n_needed} tokens exceed {what}{fix}")


def capacity(n_ctx_train: int, ga_n: int, ga_w: int) -> int:
    """(L - W)·G + W: the longest sequence Self-Extend maps inside the trained window L."""
    return SelfExtend(ga_n, ga_w).capacity(n_ctx_train)


def choose(n_ctx_train: int, n_needed: int, *, strict: bool = True) -> SelfExtend | None:
    """Smallest group size G, and for it the largest window W, that serve ``n_needed`` tokens.

    Returns None when ``n_needed`` fits the trained window (Self-Extend is not needed). W is a power of two
    between 64 and L/2; the farthest grouped position W + (N - W)/G must stay within WELL_TRAINED_SHARE of L
    (``strict``) or within L (``strict=False``, the bare capacity). Raises CapacityError when no G up to
    MAX_AUTO_GROUP does.
    """
    if n_needed <= n_ctx_train:
        return None
    limit = n_ctx_train * (WELL_TRAINED_SHARE if strict else 1.0)
    windows = [1 << k for k in range(int(math.log2(max(n_ctx_train // 2, 64))), 5, -1)]
    for g in range(2, MAX_AUTO_GROUP + 1):
        for w in windows:
            if w < n_ctx_train and w + math.ceil((n_needed - w) / g) <= limit:
                return SelfExtend(g, w)
    if strict:
        raise CapacityError(f"{n_needed} tokens are too many for a {n_ctx_train}-token model: no group size up "
                            f"to {MAX_AUTO_GROUP} keeps them in the well-trained window; shorten the text")
    return None


def _capi():
    from . import capi  # loads our libllama on first use
    return capi


def model_support(llm: Llama) -> tuple[bool, str]:
    """(supported, reason) for Self-Extend on the model loaded in ``llm``."""
    capi = _capi()
    status = capi.llama_model_self_extend_support(llm.model)
    return status == capi.LLAMA_SELF_EXTEND_OK, capi.status_str(status)


def enable_self_extend(llm: Llama, ga_n: int, ga_w: int = 0) -> SelfExtend:
    """Turn Self-Extend on (ga_n > 1) or off (ga_n == 1) for ``llm``; completion, chat and streaming then use it.

    Cached keys keep their true positions, so prefix caching works as without Self-Extend. Changing the
    setting resets ``llm`` (tokens decoded under the old setting are recomputed on the next call).
    """
    params = SelfExtend(ga_n, ga_w)
    params.check(n_ctx_train(llm))
    capi = _capi()
    changed = capi.get_self_extend(llm.ctx) != (params.ga_n, params.ga_w if params.enabled else 0)
    status = capi.llama_set_self_extend(llm.ctx, params.ga_n, params.ga_w if params.enabled else 0)
    if status == capi.LLAMA_SELF_EXTEND_ERR_INVALID_ARG:
        raise ParameterError(capi.status_str(status))
    if status != capi.LLAMA_SELF_EXTEND_OK:
        raise UnsupportedModelError(f"Self-Extend is not available for this model: {capi.status_str(status)}")
    if changed:
        llm.reset()  # the next eval drops the cached cells and decodes from the start
    return params


def self_extend_fused(llm: Llama) -> bool:
    """Whether ``llm``'s Self-Extend layers run the fused flash-attention op (needs flash attention on and the op
    on every device holding the KV cache); False when Self-Extend is off or runs the slower generic path."""
    return bool(_capi().llama_self_extend_fused(llm.ctx))


def n_ctx_train(llm: Llama) -> int:
    """The context length the model in ``llm`` was trained with."""
    return int(_capi().llama_cpp.llama_model_n_ctx_train(llm.model))


def get_self_extend(llm: Llama) -> SelfExtend:
    """The setting in force on ``llm``'s context."""
    n, w = _capi().get_self_extend(llm.ctx)
    return SelfExtend(n, w)


def load(model_path: str | Path, *, ga_n: int = 1, ga_w: int = 0, n_ctx: int = 0, verbose: bool = False,
         rpc: str | Sequence[str] | None = None, **llama_kwargs: Any) -> Llama:
    """A ``llama_cpp.Llama`` on our libllama with Self-Extend set; keyword arguments go to ``Llama``.

    Flash attention is on unless ``flash_attn=False`` is given: Self-Extend layers then run the fused op
    (``llama_self_extend_fused``), several times faster at long context than the generic path.
    ``rpc``: RPC servers (``"host:port"``, a list or comma-separated) that take the ``n_gpu_layers`` offloaded
    layers (:mod:`selfext_cpp.rpc`); RpcError when one is unreachable or lost.
    """
    llama_kwargs.setdefault("flash_attn", True)
    path = Path(model_path)
    check_gguf(path)
    params = SelfExtend(ga_n, ga_w)  # validate before the (slow) load
    from ._lib import load_llama_cpp
    llama_cpp = load_llama_cpp()
    set_llama_log(verbose)
    try:
        if rpc:
            from .rpc import load_llama
            llm = load_llama(rpc, str(path), n_ctx=n_ctx, verbose=verbose, **llama_kwargs)
        else:
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, verbose=verbose, **llama_kwargs)
    except ValueError as exc:
        raise ModelError(f"llama.cpp could not load {path}: {last_llama_error() or exc}") from exc
    enable_self_extend(llm, params.ga_n, params.ga_w)
    return llm


GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """Raise ModelError unless ``path`` is a readable file that starts like a GGUF."""
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from exc
    if head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF model file (no GGUF magic)")
    if len(head) < 8:
        raise ModelError(f"{path} is truncated")


# ---------------------------------------------------------------------------------------------
# llama.cpp's log
# ---------------------------------------------------------------------------------------------

GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
GGML_LOG_LEVEL_CONT = 5
_log: dict[str, Any] = {"verbose": False, "errors": [], "callback": None, "last_level": 0}


def set_llama_log(verbose: bool) -> None:
    """Route llama.cpp's log (process-wide): to stderr when ``verbose``, else nowhere. Either way its error
    lines are kept for :func:`last_llama_error`. (llama-cpp-python's own callback still prints errors when
    ``verbose=False``, and with outdated level numbers.)"""
    _log["verbose"] = verbose
    if _log["callback"] is None:
        ll = _capi().llama_cpp

        @ll.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            msg = text.decode("utf-8", errors="replace")
            if level == GGML_LOG_LEVEL_CONT:
                level = _log["last_level"]
            _log["last_level"] = level
            if level == GGML_LOG_LEVEL_ERROR:
                _log["errors"] = (_log["errors"] + [msg])[:16]
            if _log["verbose"]:
                sys.stderr.write(msg)
                sys.stderr.flush()

        _log["callback"] = callback  # keep the ctypes thunk alive as long as llama.cpp may call it
        ll.llama_log_set(callback, None)
    _log["errors"] = []


def last_llama_error() -> str:
    """The first error line llama.cpp logged since the last :func:`set_llama_log` (the cause; later lines only
    report the failure upwards), without its function-name prefix; "" when none."""
    lines = [line.strip() for line in "".join(_log["errors"]).splitlines() if line.strip()]
    if not lines:
        return ""
    head, sep, rest = lines[0].partition(": ")
    line = rest if sep and " " not in head else lines[0]
    return line.removeprefix("error loading model: ")


# ---------------------------------------------------------------------------------------------
# Prefill and generation
# ---------------------------------------------------------------------------------------------


def prefill(llm: Llama, tokens: Sequence[int], on_progress: Callable[[int, int], None] | None = None) -> None:
    """Evaluate ``tokens`` into ``llm``'s KV cache from position 0, ``n_batch`` at a time, calling
    ``on_progress(done, total)`` after each batch. A following ``llm.generate(tokens)`` (or completion on the
    same token list) finds the whole prompt cached and samples at once, without evaluating it again."""
    tokens = list(tokens)
    if not tokens:
        raise ParameterError("the prompt is empty: give some text with -p, -f or on stdin")
    if len(tokens) >= llm.n_ctx():
        raise ParameterError(f"the prompt has {len(tokens)} tokens, the context holds {llm.n_ctx()}: "
                             f"raise --ctx-size to at least {len(tokens) + 1}")
    llm.reset()  # n_tokens = 0: eval() then drops every cached cell first
    step = llm.n_batch
    for i in range(0, len(tokens), step):
        llm.eval(tokens[i : i + step])
        if on_progress is not None:
            on_progress(min(i + step, len(tokens)), len(tokens))


@dataclass
class Generation:
    """Counts and timings of one :func:`stream` run, filled in as it goes."""

    n_prompt: int = 0
    n_generated: int = 0
    finish_reason: str = "length"  # "stop": the model ended its text
    prefill_s: float = 0.0
    generate_s: float = 0.0
    text: list[str] = field(default_factory=list)


def stream(llm: Llama, tokens: Sequence[int], *, max_tokens: int, temp: float = 0.8, top_k: int = 40,
           top_p: float = 0.95, min_p: float = 0.05, seed: int | None = None,
           on_progress: Callable[[int, int], None] | None = None,
           result: Generation | None = None) -> Iterator[str]:
    """Prefill ``tokens`` (with progress), then yield the generated text piece by piece (whole UTF-8
    characters), until an end-of-generation token, ``max_tokens`` tokens or a full context.
    ``result`` receives the counts and timings."""
    res = result if result is not None else Generation()
    res.n_prompt = len(tokens)
    t0 = time.perf_counter()
    prefill(llm, tokens, on_progress)
    res.prefill_s = time.perf_counter() - t0
    ll = _capi().llama_cpp
    vocab = llm._model.vocab
    if seed is not None:
        llm.set_seed(seed & 0xFFFFFFFF)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    limit = min(max_tokens, llm.n_ctx() - len(tokens))
    t1 = time.perf_counter()
    try:
        if limit <= 0:
            return
        for token in llm.generate(tokens, top_k=top_k, top_p=top_p, min_p=min_p, temp=temp):
            if ll.llama_vocab_is_eog(vocab, token):
                res.finish_reason = "stop"
                break
            res.n_generated += 1
            piece = decoder.decode(llm.detokenize([token]))
            if piece:
                res.text.append(piece)
                yield piece
            if res.n_generated >= limit:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            res.text.append(tail)
            yield tail
    finally:
        res.generate_s = time.perf_counter() - t1
