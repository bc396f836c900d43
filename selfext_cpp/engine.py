"""Self-Extend on llama-cpp-python's ``Llama``: parameters, capacity, automatic choice, enabling."""

from __future__ import annotations

import math
from dataclasses import dataclass
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
            raise CapacityError(f"{n_needed} tokens exceed the capacity {self.capacity(n_ctx_train)} of "
                                f"--ga-n {self.ga_n} --ga-w {self.ga_w} on a {n_ctx_train}-token model{fix}")


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
        llm.reset()  # also clears the KV cache
    return params


def n_ctx_train(llm: Llama) -> int:
    """The context length the model in ``llm`` was trained with."""
    return int(_capi().llama_cpp.llama_model_n_ctx_train(llm.model))


def get_self_extend(llm: Llama) -> SelfExtend:
    """The setting in force on ``llm``'s context."""
    n, w = _capi().get_self_extend(llm.ctx)
    return SelfExtend(n, w)


def load(model_path: str | Path, *, ga_n: int = 1, ga_w: int = 0, n_ctx: int = 0, verbose: bool = False,
         **llama_kwargs: Any) -> Llama:
    """A ``llama_cpp.Llama`` on our libllama with Self-Extend set; keyword arguments go to ``Llama``."""
    path = Path(model_path)
    check_gguf(path)
    params = SelfExtend(ga_n, ga_w)  # validate before the (slow) load
    from ._lib import load_llama_cpp
    llama_cpp = load_llama_cpp()
    try:
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, verbose=verbose, **llama_kwargs)
    except ValueError as exc:
        raise ModelError(f"llama.cpp could not load {path}: {exc}") from exc
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
