"""selfext: exact Self-Extend (long context without training) for llama.cpp models.

    from selfext_cpp import load
    llm = load("model.gguf", ga_n=4, ga_w=512, n_ctx=16384)
    llm.create_completion(long_prompt, max_tokens=64)

The heavy parts (our libllama, llama_cpp) load on first use, so importing this package is cheap.
"""

from __future__ import annotations

from .engine import (SelfExtend, capacity, choose, enable_self_extend, get_self_extend, load, model_support,
                     self_extend_fused)
from .errors import (CapacityError, HubError, LibraryError, ModelError, ParameterError, RpcError, SelfextError,
                     UnsupportedModelError)

__version__ = "0.1.0"

__all__ = [
    "SelfExtend", "capacity", "choose", "enable_self_extend", "get_self_extend", "load", "model_support",
    "self_extend_fused",
    "SelfextError", "LibraryError", "ModelError", "UnsupportedModelError", "ParameterError", "CapacityError",
    "HubError", "RpcError", "__version__",
]
