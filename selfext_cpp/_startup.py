"""What runs when an interpreter of a selfext environment starts (``selfext_cpp.pth`` imports the package):
point llama-cpp-python at our libllama. Only ``os`` and ``sys``, which every interpreter has loaded by then, so
that the hook costs no interpreter start more than a few file lookups."""

from __future__ import annotations

import os
import sys

_LIB_NAMES = {"win32": "llama.dll", "darwin": "libllama.dylib"}


def use_our_library() -> None:
    """Have llama-cpp-python load our libllama in this process (and the processes it starts), unless the user
    chose a library: sets LLAMA_CPP_LIB_PATH, before ``llama_cpp`` is first imported.

    So a plain ``import llama_cpp`` — by any package — loads our libllama in an environment where selfext is
    installed. Also runs on ``import selfext_cpp`` (for interpreters started with ``-S``).
    """
    if "llama_cpp.llama_cpp" in sys.modules or os.environ.get("LLAMA_CPP_LIB_PATH"):
        return
    name = _LIB_NAMES.get(sys.platform, "libllama.so")
    directory = os.environ.get("SELFEXT_LIB_PATH") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")
    if not os.path.exists(os.path.join(directory, name)):  # an editable install keeps lib/ apart from the sources
        from ._lib import lib_dir

        directory = str(lib_dir())
    if os.path.exists(os.path.join(directory, name)):
        os.environ["LLAMA_CPP_LIB_PATH"] = directory
