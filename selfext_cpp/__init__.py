"""selfext: exact Self-Extend (long context without training) for llama.cpp models.

    from selfext_cpp import load
    llm = load("model.gguf", ga_n=4, ga_w=512, n_ctx=16384)
    llm.create_completion(long_prompt, max_tokens=64)

Importing this package is cheap: its names load on first use, and our libllama with ``llama_cpp``.
"""

from __future__ import annotations

import importlib

from ._startup import use_our_library

TYPE_CHECKING = False  # typing's own costs every interpreter start a few ms (this runs at startup)
if TYPE_CHECKING:
    from typing import Any

    from .engine import (SelfExtend, capacity, choose, enable_self_extend, get_self_extend, load, model_support,
                         plan, self_extend_fused, self_extend_keys, set_self_extend_keys)
    from .errors import (CapacityError, HubError, LibraryError, ModelError, ParameterError, RpcError,
                         SelfextError, SlowPathWarning, UnsupportedModelError)

__version__ = "0.1.0"

__all__ = [
    # engine
    "SelfExtend", "capacity", "choose", "plan", "enable_self_extend", "get_self_extend", "load", "model_support",
    "self_extend_fused", "set_self_extend_keys", "self_extend_keys",
    # errors
    "SelfextError", "LibraryError", "ModelError", "UnsupportedModelError", "ParameterError", "CapacityError",
    "HubError", "RpcError", "SlowPathWarning",
    "__version__",
]
_WHERE = {name: "errors" if name.endswith(("Error", "Warning")) else "engine" for name in __all__[:-1]}

use_our_library()  # a later plain `import llama_cpp` loads our libllama too


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
