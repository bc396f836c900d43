"""Everything selfext takes from llama-cpp-python beyond its public API, in one place.

selfext reuses llama-cpp-python's Python layer whole, pinned to one version (LLAMA_CPP_PYTHON, the same as
pyproject.toml's dependency). Where it reaches past the documented API — a private attribute, a class it
replaces, a method it wraps — it does so through this module, so that moving to another version means reading
this file. :func:`check_version` refuses another version with one clear line.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import LibraryError

if TYPE_CHECKING:
    from llama_cpp import Llama

LLAMA_CPP_PYTHON = "0.3.36"


def check_version(llama_cpp: ModuleType) -> None:
    """Raise LibraryError unless ``llama_cpp`` is the llama-cpp-python version this module was written for."""
    version = getattr(llama_cpp, "__version__", "?")
    if version != LLAMA_CPP_PYTHON:
        raise LibraryError(f"selfext needs llama-cpp-python {LLAMA_CPP_PYTHON}, found {version}: "
                           f"pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON}' (with CMAKE_ARGS=\"-DLLAMA_BUILD=OFF "
                           "-DLLAVA_BUILD=OFF\")")


# --- the low-level module -------------------------------------------------------------------------------------

# ``ll`` below is the low-level binding, ``llama_cpp.llama_cpp``

def shared_library(ll: ModuleType) -> ctypes.CDLL:
    """The libllama the binding loaded (private ``llama_cpp.llama_cpp._lib``)."""
    return ll._lib


def rope_type_names(ll: ModuleType) -> dict[int, str]:
    """llama_rope_type values, named as llama.h names them (LLAMA_ROPE_TYPE_NEOX -> "neox")."""
    return {getattr(ll, f"LLAMA_ROPE_TYPE_{n.upper()}"): n for n in ("none", "norm", "neox", "mrope", "imrope",
                                                                       "vision")}


def ggml_type(ll: ModuleType, name: str) -> int:
    """A ggml_type id by name ("F32", "F16", "Q8_0", "I32"), as the binding defines GGML_TYPE_*."""
    return int(getattr(ll, f"GGML_TYPE_{name}"))


# --- Llama ----------------------------------------------------------------------------------------------------

def vocab(llm: Llama) -> Any:
    """The llama_vocab pointer of ``llm``'s model (private ``Llama._model.vocab``)."""
    return llm._model.vocab


def context_limit(llm: Llama) -> int:
    """The token limit ``Llama`` enforces on prompt + completion (private ``Llama._n_ctx``)."""
    return int(llm._n_ctx)


def set_context_limit(llm: Llama, n_tokens: int) -> None:
    """Make ``Llama`` refuse prompts of ``n_tokens`` or more and stop completions there. It reads the private
    ``_n_ctx``, which it sets to the context's real size; llama.cpp pads that size up (to 256s)."""
    llm._n_ctx = n_tokens


# --- the server (llama_cpp.server) ----------------------------------------------------------------------------

def answer_route_errors_first(answer: Callable[[BaseException, str], tuple[int, dict[str, Any]] | None]) -> None:
    """Let ``answer(error, path)`` answer an error raised on any route of llama-cpp-python's app before its own
    handling does (which maps all but two of its own messages to 500).

    Its ``RouteErrorHandler`` has no hook for that; we wrap its ``error_message_wrapper``, class-wide (FastAPI
    may copy routes, and their app is one per process anyway), once.
    """
    from llama_cpp.server.errors import RouteErrorHandler

    default = RouteErrorHandler.error_message_wrapper
    if getattr(default, "selfext_answer", None) is answer:
        return
    default = getattr(default, "selfext_default", default)

    def error_message_wrapper(self: RouteErrorHandler, error: Exception,
                              body: Any = None) -> tuple[int, dict[str, Any]]:
        return answer(error, self.path) or default(self, error=error, body=body)

    error_message_wrapper.selfext_answer = answer  # type: ignore[attr-defined]
    error_message_wrapper.selfext_default = default  # type: ignore[attr-defined]
    RouteErrorHandler.error_message_wrapper = error_message_wrapper  # type: ignore[method-assign]


@contextmanager
def proxy_class(cls: type) -> Iterator[None]:
    """llama-cpp-python's ``create_app`` builds its model proxy from the module-level name ``LlamaProxy`` of
    ``llama_cpp.server.app``: have it build ``cls`` instead, while the block runs."""
    from llama_cpp.server import app as base

    saved = base.LlamaProxy
    base.LlamaProxy = cls  # type: ignore[misc]
    try:
        yield
    finally:
        base.LlamaProxy = saved  # type: ignore[misc]
