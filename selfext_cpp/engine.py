"""Self-Extend on llama-cpp-python's ``Llama``: parameters, capacity, automatic choice, enabling."""

from __future__ import annotations

import codecs
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import compat
from .errors import CapacityError, ModelError, ParameterError, SlowPathWarning, UnsupportedModelError

if TYPE_CHECKING:
    from llama_cpp import Llama

    from .models import ModelMeta

# The automatic choice (docs/RESULTS.md, "Choosing G and W"): the neighbour window is a quarter of the trained
# window, and the group size the smallest power of two that keeps the farthest grouped position inside the
# share of the trained window that models are well trained on. On SmolLM2 (trained 8K) the larger window
# found the keys that smaller windows with smaller groups missed; a fixed window means a small change in length
# never moves W, and G only doubles.
WELL_TRAINED_SHARE = 2 / 3
WINDOW_SHARE = 4  # W = the largest power of two <= L / WINDOW_SHARE
MAX_AUTO_GROUP = 64


@dataclass(frozen=True)
class SelfExtend:
    """Group size ``ga_n`` (G) and neighbour window ``ga_w`` (W); G == 1 means vanilla attention."""

    ga_n: int = 1
    ga_w: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ga_n, bool) or not isinstance(self.ga_n, int) or self.ga_n < 1:
            raise ParameterError(f"{{ga_n}} must be an integer >= 1, got {self.ga_n!r}")
        if self.ga_n > 1 and (isinstance(self.ga_w, bool) or not isinstance(self.ga_w, int) or self.ga_w < 1):
            raise ParameterError(f"{{ga_w}} must be an integer >= 1, got {self.ga_w!r}")

    @property
    def enabled(self) -> bool:
        return self.ga_n > 1

    def capacity(self, n_ctx_train: int) -> int:
        """Longest sequence whose farthest grouped position (:meth:`farthest`) stays inside the trained window L:
        (L - W)·G + W when G divides W (the paper's formula), (L - W)·G + (W//G)·G in general."""
        if not self.enabled:
            return n_ctx_train
        return (n_ctx_train - self.ga_w) * self.ga_n + self.ga_w // self.ga_n * self.ga_n

    def farthest(self, n_tokens: int) -> int:
        """The largest relative position the model sees in a sequence of ``n_tokens``: n - 1 without
        Self-Extend; with it, the last query's grouped position less the first key's, (n - 1)//G + W - W//G
        (or W - 1 inside the window). A sequence fits the trained window L while this stays below L."""
        if not self.enabled or n_tokens <= self.ga_w:
            return max(n_tokens - 1, 0)
        return (n_tokens - 1) // self.ga_n + self.ga_w - self.ga_w // self.ga_n

    def describe(self) -> str:
        """"ga_n 8, ga_w 2048" (or "off"), in the library's parameter names; front ends render the braces."""
        return f"{{ga_n}} {self.ga_n} {{ga_w}} {self.ga_w}" if self.enabled else "off"

    def check(self, n_ctx_train: int, n_needed: int | None = None) -> None:
        """Raise ParameterError/CapacityError when these parameters cannot serve ``n_needed`` tokens."""
        if self.enabled and self.ga_w >= n_ctx_train:
            raise ParameterError(f"{{ga_w}} {self.ga_w} must be smaller than the model's trained context "
                                 f"({n_ctx_train}); try {{ga_w}} {auto_window(n_ctx_train)}")
        if n_needed is not None and n_needed > self.capacity(n_ctx_train):
            hint = choose(n_ctx_train, n_needed, strict=False)
            fix = f"; try {hint.describe()}" if hint else ""
            what = (f"the capacity {self.capacity(n_ctx_train)} of {self.describe()} on a {n_ctx_train}-token "
                    "model" if self.enabled else
                    f"the model's trained context ({n_ctx_train}), and Self-Extend is off")
            raise CapacityError(f"{n_needed} tokens exceed {what}{fix}")


def capacity(n_ctx_train: int, ga_n: int, ga_w: int) -> int:
    """The longest sequence Self-Extend maps inside the trained window L: (L - W)·G + W when G divides W."""
    return SelfExtend(ga_n, ga_w).capacity(n_ctx_train)


def auto_window(n_ctx_train: int) -> int:
    """The automatic neighbour window W for a model trained on L tokens: the largest power of two <= L/4."""
    return 1 << max(0, (max(n_ctx_train // WINDOW_SHARE, 1)).bit_length() - 1)


def choose(n_ctx_train: int, n_needed: int, *, strict: bool = True) -> SelfExtend | None:
    """The automatic setting for ``n_needed`` tokens: W = :func:`auto_window`, and the smallest power-of-two
    group size G whose farthest grouped position (:meth:`SelfExtend.farthest`) stays within
    WELL_TRAINED_SHARE of the trained window L (``strict``) or within L (``strict=False``: the bare capacity).

    Returns None when ``n_needed`` fits the trained window (Self-Extend is not needed). Raises CapacityError
    when no G up to MAX_AUTO_GROUP does (``strict``), else returns None.
    """
    if n_needed <= n_ctx_train:
        return None
    limit = n_ctx_train * WELL_TRAINED_SHARE if strict else n_ctx_train
    w = auto_window(n_ctx_train)
    g = 2
    while g <= MAX_AUTO_GROUP:
        se = SelfExtend(g, w)
        if se.farthest(n_needed) < limit:
            return se
        g *= 2
    if strict:
        raise CapacityError(f"{n_needed} tokens are too many for a {n_ctx_train}-token model: no group size up "
                            f"to {MAX_AUTO_GROUP} keeps them in the well-trained window; shorten the text")
    return None


def plan(n_ctx_train: int, n_needed: int | None = None, *, ga_n: int | None = None, ga_w: int | None = None,
         auto: bool = False) -> SelfExtend:
    """The Self-Extend setting for ``n_needed`` tokens on a model trained on ``n_ctx_train``: the one rule the
    command line, the server and the evaluation harnesses share.

    ``auto``: :func:`choose`'s setting (off when the tokens fit the trained window). Otherwise ``ga_n``/``ga_w``
    as given (``ga_n`` None or 1: off; ``ga_w`` None: :func:`auto_window`), checked against the trained window
    and, when ``n_needed`` is given, against the capacity. Raises ParameterError for ``auto`` together with
    ``ga_n``/``ga_w``, or ``ga_w`` without ``ga_n``; CapacityError when the tokens do not fit.
    """
    check_request(ga_n=ga_n, ga_w=ga_w, auto=auto)
    if auto:
        if n_needed is None:
            raise ParameterError("{auto} needs the number of tokens to plan for")
        return choose(n_ctx_train, n_needed) or SelfExtend()
    if ga_n is None or ga_n == 1:
        se = SelfExtend()
    else:
        se = SelfExtend(ga_n, auto_window(n_ctx_train) if ga_w is None else ga_w)
    se.check(n_ctx_train, n_needed)
    return se


def serving_plan(n_ctx_train: int, *, ga_n: int | None = None, ga_w: int | None = None, n_ctx: int = 0,
                 auto_max_ctx: int | None = None) -> tuple[SelfExtend, int]:
    """The Self-Extend setting (:func:`plan`) and the context (prompt + completion tokens of one request) that
    a server serves; both servers (``selfext serve``, with or without ``--parallel``) take it from here.

    With ``auto_max_ctx`` N: the automatic setting for N (off when N fits the trained context), context N.
    Otherwise G and W as given, and context ``n_ctx``, or when 0 all that G and W reach (the trained context
    when Self-Extend is off). Raises ParameterError on conflicting options, CapacityError when the context is
    longer than G and W reach.
    """
    if auto_max_ctx is not None and n_ctx:
        raise ParameterError(f"give either {{n_ctx}} or {{auto}}, not both ({{auto}} {auto_max_ctx} serves a "
                             f"{auto_max_ctx}-token context)")
    params = plan(n_ctx_train, auto_max_ctx or n_ctx or None, ga_n=ga_n, ga_w=ga_w, auto=auto_max_ctx is not None)
    return params, auto_max_ctx or n_ctx or params.capacity(n_ctx_train)


# bytes per KV cell that llama.cpp keeps on the host besides K and V (position, sequences, shift; llama-kv-cells.h),
# rounded up
KV_CELL_HOST_BYTES = 64


def check_context_memory(meta: ModelMeta, n_ctx: int, *, slots: int = 1, n_gpu_layers: int = 0,
                         rpc: bool = False) -> None:
    """Raise ParameterError when a context of ``n_ctx`` cells (per slot, for a server with ``slots`` sequences of
    their own) cannot fit this machine: its f16 KV cache (every layer at full length, an upper bound for
    sliding-window models) and llama.cpp's per-cell bookkeeping against the host's memory, plus the GPUs' when
    layers are offloaded. Without this a mistyped ``-c`` makes llama.cpp fill the host's memory before any
    allocation fails. Not checked with RPC servers (their memory is remote)."""
    if rpc or n_ctx <= 0:
        return
    per_cell = meta.n_layer * meta.n_head_kv * (meta.n_embd_head_k + meta.n_embd_head_v) * 2 + KV_CELL_HOST_BYTES
    need, have = n_ctx * slots * per_cell, machine_memory(gpu=n_gpu_layers != 0)
    if need > have:
        what = f"{slots} slots of {n_ctx} tokens need" if slots > 1 else f"a context of {n_ctx} tokens needs"
        raise ParameterError(f"{what} about {need / 2**30:.1f} GiB for the KV cache, more than this machine's "
                             f"{have / 2**30:.1f} GiB of memory: lower {{n_ctx}}")


def machine_memory(*, gpu: bool) -> int:
    """Bytes of memory on this machine: the host's, plus every discrete GPU's (as ggml reports them) when ``gpu``."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if gpu:
        from ._ggml import gpu_memory_total  # loads our libllama, and with it ggml's backends

        total += gpu_memory_total()
    return total


def check_request(*, ga_n: int | None = None, ga_w: int | None = None, auto: bool = False) -> None:
    """The checks of :func:`plan` that need no model, for front ends to run before anything slow: ``auto``
    with ``ga_n``/``ga_w``, ``ga_w`` without ``ga_n``, and the ranges of G and W (ParameterError)."""
    if auto and (ga_n is not None or ga_w is not None):
        raise ParameterError("{auto} chooses G and W itself: give either {auto} or {ga_n}/{ga_w}, not both")
    if ga_w is not None and ga_n is None:
        raise ParameterError("{ga_w} needs {ga_n} (a group size > 1) to take effect")
    if ga_n is not None:
        SelfExtend(ga_n, 1 if ga_n > 1 and ga_w is None else (ga_w or 0))


def _capi():
    from . import capi  # loads our libllama on first use
    return capi


def model_support(llm: Llama) -> tuple[bool, str]:
    """(supported, reason) for Self-Extend on the model loaded in ``llm``."""
    capi = _capi()
    status = capi.llama_model_self_extend_support(llm.model)
    return status == capi.LLAMA_SELF_EXTEND_OK, capi.status_str(status)


def enable_self_extend(llm: Llama, ga_n: int, ga_w: int = 0, *, warn_slow: bool = True) -> SelfExtend:
    """Turn Self-Extend on (ga_n > 1) or off (ga_n == 1) for ``llm``; completion, chat and streaming then use it.

    Cached keys keep their true positions, so prefix caching works as without Self-Extend. Changing the
    setting resets ``llm`` (tokens decoded under the old setting are recomputed on the next call). On a context
    with flash attention off (llama-cpp-python's default) Self-Extend runs its generic path, and a
    :class:`SlowPathWarning` says so unless ``warn_slow=False`` (callers that chose flash attention themselves).
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
    if warn_slow and params.enabled and not self_extend_fused(llm) and not _flash_attn_on(llm):
        warnings.warn("Self-Extend runs its generic attention path, several times slower than its fused "
                      "flash-attention op: flash attention is off on this context (create the Llama with "
                      "flash_attn=True)", SlowPathWarning, stacklevel=2)
    return params


def _flash_attn_on(llm: Llama) -> bool:
    """Whether ``llm``'s context was made with flash attention on (or left to llama.cpp's choice)."""
    return llm.context_params.flash_attn_type != _capi().llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


def self_extend_fused(llm: Llama) -> bool:
    """Whether ``llm``'s Self-Extend layers run the fused flash-attention op (needs flash attention on and the op
    on every device holding the KV cache); False when Self-Extend is off or runs the slower generic path."""
    return bool(_capi().llama_self_extend_fused(llm.ctx))


KEYS_FORMS = ("auto", "steps", "table", "cache")  # LLAMA_SELF_EXTEND_KEYS_AUTO .. _CACHE, in the C enum's order


def check_keys(keys: str) -> int:
    """The C value of a form of the grouped keys named by ``keys`` (one of KEYS_FORMS); ParameterError otherwise."""
    if keys not in KEYS_FORMS:
        raise ParameterError(f"{{ga_keys}} is one of {', '.join(KEYS_FORMS)}, not {keys!r}")
    return KEYS_FORMS.index(keys)


def keys_environ(keys: str | None) -> dict[str, str]:
    """The environment for a child process (llama-server, a benchmark's) whose contexts leave the form of the grouped
    keys to libllama: this one with LLAMA_SELF_EXTEND_KEYS set to ``keys``, unless it is None or "auto" (then the
    environment's own setting stands)."""
    return {**os.environ, **({"LLAMA_SELF_EXTEND_KEYS": keys} if keys and keys != "auto" else {})}


def set_self_extend_keys(llm: Llama, keys: str) -> None:
    """Ask for a form of the fused path's grouped keys on ``llm``: "steps" (nothing kept per cell), "table" (a
    rotation table, n_rot halves per cell), "cache" (one more K cache), or "auto", the library's choice per device.
    Takes effect at once; a form that a device holding the KV cache lacks gives "cache" (:func:`self_extend_keys`)."""
    capi = _capi()
    status = capi.llama_set_self_extend_keys(llm.ctx, check_keys(keys))
    if status != capi.LLAMA_SELF_EXTEND_OK:
        raise ParameterError(capi.status_str(status))


def self_extend_keys(llm: Llama) -> str | None:
    """The form of the grouped keys ``llm``'s fused path keeps ("steps", "table" or "cache"); None where it does not
    run the fused path (Self-Extend off, or its generic path)."""
    capi = _capi()
    return capi.keys_str(capi.llama_get_self_extend_keys(llm.ctx))


def n_ctx_train(llm: Llama) -> int:
    """The context length the model in ``llm`` was trained with."""
    return int(_capi().llama_cpp.llama_model_n_ctx_train(llm.model))


def get_self_extend(llm: Llama) -> SelfExtend:
    """The setting in force on ``llm``'s context."""
    n, w = _capi().get_self_extend(llm.ctx)
    return SelfExtend(n, w)


LLAMA_CTX_PAD = 256  # llama_context pads n_ctx to a multiple of this (llama-context.cpp)


def load(model_path: str | Path, *, ga_n: int = 1, ga_w: int = 0, ga_keys: str = "auto", n_ctx: int = 0,
         verbose: bool = False, rpc: str | Sequence[str] | None = None, **llama_kwargs: Any) -> Llama:
    """A ``llama_cpp.Llama`` on our libllama with Self-Extend set; keyword arguments go to ``Llama``.

    Flash attention is on unless ``flash_attn=False`` is given: Self-Extend layers then run the fused op
    (``llama_self_extend_fused``), several times faster at long context than the generic path, keeping its grouped
    keys in the form ``ga_keys`` asks for (:func:`set_self_extend_keys`).
    ``rpc``: RPC servers (``"host:port"``, a list or comma-separated) that take the ``n_gpu_layers`` offloaded
    layers (:mod:`selfext_cpp.rpc`); RpcError when one is unreachable or lost.
    """
    check_keys(ga_keys)
    llama_kwargs.setdefault("flash_attn", True)
    if n_ctx > 0:  # llama.cpp pads every context to this; asking for it keeps llama-cpp-python's buffers as large
        n_ctx = -(-n_ctx // LLAMA_CTX_PAD) * LLAMA_CTX_PAD
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
    set_self_extend_keys(llm, ga_keys)  # before the setting, so that the grouped keys are made once
    enable_self_extend(llm, params.ga_n, params.ga_w, warn_slow=False)  # flash_attn is the caller's choice here
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
        raise ParameterError("the prompt is empty")
    if len(tokens) >= llm.n_ctx():
        raise ParameterError(f"the prompt has {len(tokens)} tokens, the context holds {llm.n_ctx()}: "
                             f"raise {{n_ctx}} to at least {len(tokens) + 1}")
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
    vocab = compat.vocab(llm)
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
