"""ctypes binding of libllama's Self-Extend API (patches/include/llama-self-extend.h)."""

from __future__ import annotations

import ctypes

from ._lib import API_VERSION, load_llama_cpp
from .errors import LibraryError

_llama_cpp = load_llama_cpp()
llama_cpp = _llama_cpp.llama_cpp  # the low-level module, for callers of this binding
ctypes_function = _llama_cpp.llama_cpp.ctypes_function

llama_context_p = _llama_cpp.llama_cpp.llama_context_p_ctypes
llama_model_p = _llama_cpp.llama_cpp.llama_model_p_ctypes

LLAMA_SELF_EXTEND_OK = 0
LLAMA_SELF_EXTEND_ERR_INVALID_ARG = -1
LLAMA_SELF_EXTEND_ERR_NO_ROPE = -2
LLAMA_SELF_EXTEND_ERR_ROPE_TYPE = -3
LLAMA_SELF_EXTEND_ERR_MEMORY = -4
LLAMA_SELF_EXTEND_ERR_ARCH = -5

# enum llama_self_extend_keys: the fused path's grouped keys
LLAMA_SELF_EXTEND_KEYS_NONE = -1
LLAMA_SELF_EXTEND_KEYS_AUTO = 0
LLAMA_SELF_EXTEND_KEYS_STEPS = 1
LLAMA_SELF_EXTEND_KEYS_TABLE = 2
LLAMA_SELF_EXTEND_KEYS_CACHE = 3


# LLAMA_API int32_t llama_self_extend_api_version(void);
@ctypes_function("llama_self_extend_api_version", [], ctypes.c_int32)
def llama_self_extend_api_version() -> int:
    """LLAMA_SELF_EXTEND_API_VERSION of the loaded library."""
    ...


if llama_self_extend_api_version() != API_VERSION:
    raise LibraryError(f"libllama speaks Self-Extend API {llama_self_extend_api_version()}, this package "
                       f"{API_VERSION}: reinstall selfext so the library and the package match")


# LLAMA_API const char * llama_self_extend_upstream_commit(void);
@ctypes_function("llama_self_extend_upstream_commit", [], ctypes.c_char_p)
def llama_self_extend_upstream_commit() -> bytes:
    """The upstream llama.cpp commit the library was built from."""
    ...


# LLAMA_API const char * llama_self_extend_status_str(int32_t status);
@ctypes_function("llama_self_extend_status_str", [ctypes.c_int32], ctypes.c_char_p)
def llama_self_extend_status_str(status: int, /) -> bytes:
    """A short English description of a status value."""
    ...


# LLAMA_API int32_t llama_model_self_extend_support(const struct llama_model * model);
@ctypes_function("llama_model_self_extend_support", [llama_model_p], ctypes.c_int32)
def llama_model_self_extend_support(model: llama_model_p, /) -> int:
    """LLAMA_SELF_EXTEND_OK when Self-Extend can run exactly on the model, else a negative status."""
    ...


# LLAMA_API int32_t llama_set_self_extend(struct llama_context * ctx, int32_t ga_n, int32_t ga_w);
@ctypes_function("llama_set_self_extend", [llama_context_p, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32)
def llama_set_self_extend(ctx: llama_context_p, ga_n: int, ga_w: int, /) -> int:
    """Enable Self-Extend (ga_n > 1) or disable it (ga_n == 1) on a context; returns a status."""
    ...


# LLAMA_API void llama_get_self_extend(const struct llama_context * ctx, int32_t * ga_n, int32_t * ga_w);
@ctypes_function("llama_get_self_extend",
                 [llama_context_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32)], None)
def llama_get_self_extend(ctx: llama_context_p, ga_n: "ctypes._Pointer[ctypes.c_int32]",
                          ga_w: "ctypes._Pointer[ctypes.c_int32]", /) -> None:
    """The context's current setting (1, 0 when off)."""
    ...


# LLAMA_API bool llama_self_extend_fused(const struct llama_context * ctx);
@ctypes_function("llama_self_extend_fused", [llama_context_p], ctypes.c_bool)
def llama_self_extend_fused(ctx: llama_context_p, /) -> bool:
    """Whether the context's Self-Extend layers run the fused flash-attention op."""
    ...


# LLAMA_API int32_t llama_set_self_extend_keys(struct llama_context * ctx, int32_t keys);
@ctypes_function("llama_set_self_extend_keys", [llama_context_p, ctypes.c_int32], ctypes.c_int32)
def llama_set_self_extend_keys(ctx: llama_context_p, keys: int, /) -> int:
    """Ask for a form of the fused path's grouped keys (LLAMA_SELF_EXTEND_KEYS_*); returns a status."""
    ...


# LLAMA_API int32_t llama_get_self_extend_keys(const struct llama_context * ctx);
@ctypes_function("llama_get_self_extend_keys", [llama_context_p], ctypes.c_int32)
def llama_get_self_extend_keys(ctx: llama_context_p, /) -> int:
    """The form of the grouped keys in use, or LLAMA_SELF_EXTEND_KEYS_NONE without the fused path."""
    ...


# LLAMA_API const char * llama_self_extend_keys_str(int32_t keys);
@ctypes_function("llama_self_extend_keys_str", [ctypes.c_int32], ctypes.c_char_p)
def llama_self_extend_keys_str(keys: int, /) -> bytes | None:
    """The name of a LLAMA_SELF_EXTEND_KEYS_* value ("auto", "steps", "table", "cache"); None for NONE and others."""
    ...


def keys_str(keys: int) -> str | None:
    name = llama_self_extend_keys_str(keys)
    return name.decode() if name is not None else None


def upstream_commit() -> str:
    return llama_self_extend_upstream_commit().decode()


def status_str(status: int) -> str:
    return llama_self_extend_status_str(status).decode()


def get_self_extend(ctx: llama_context_p) -> tuple[int, int]:
    n, w = ctypes.c_int32(), ctypes.c_int32()
    llama_get_self_extend(ctx, ctypes.byref(n), ctypes.byref(w))
    return n.value, w.value
