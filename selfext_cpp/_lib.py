"""Loading our libllama under llama-cpp-python.

llama-cpp-python's Python layer (``llama_cpp``) loads libllama from ``LLAMA_CPP_LIB_PATH`` when it is first
imported. We point it at the libraries installed inside this package (or at ``SELFEXT_LIB_PATH``, for a
development build) at interpreter start (:func:`selfext_cpp._startup.use_our_library`), and check that the
library it loaded exports the Self-Extend API (:func:`load_llama_cpp`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

from .errors import LibraryError

PACKAGE_LIB_DIR = Path(__file__).resolve().parent / "lib"
API_VERSION = 4  # LLAMA_SELF_EXTEND_API_VERSION this package speaks


def lib_dir() -> Path:
    """The directory our libllama is loaded from: SELFEXT_LIB_PATH, else where the wheel installed it."""
    override = os.environ.get("SELFEXT_LIB_PATH")
    if override:
        return Path(override).resolve()
    if lib_file(PACKAGE_LIB_DIR).exists():
        return PACKAGE_LIB_DIR
    return _installed_lib_dir() or PACKAGE_LIB_DIR


def _installed_lib_dir() -> Path | None:
    """The lib/ folder recorded by the installed distribution (an editable install keeps it apart from the
    sources)."""
    from importlib import metadata

    try:
        files = metadata.distribution("selfext").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.parent.name == "lib" and f.name == lib_file(Path()).name:
            return Path(str(f.locate())).resolve().parent
    return None


def lib_file(directory: Path, name: str = "llama") -> Path:
    """The shared library ``name`` of a build (llama, ggml, ...) in directory, as this platform names it."""
    if sys.platform == "win32":
        return directory / f"{name}.dll"
    if sys.platform == "darwin" and (directory / f"lib{name}.dylib").exists():
        return directory / f"lib{name}.dylib"
    return directory / f"lib{name}.so"


def load_llama_cpp() -> ModuleType:
    """Import ``llama_cpp`` bound to our libllama and return it.

    Raises LibraryError when the library is missing, when ``llama_cpp`` is not the llama-cpp-python version
    selfext is written for, or when it was already imported with another libllama (LLAMA_CPP_LIB_PATH set to
    another library).
    """
    directory = lib_dir()
    if "llama_cpp.llama_cpp" not in sys.modules:
        path = lib_file(directory)
        if not path.exists():
            raise LibraryError(f"no libllama at {path}: reinstall selfext (pip install selfext) "
                               "or set SELFEXT_LIB_PATH to a directory holding a selfext build")
        os.environ["LLAMA_CPP_LIB_PATH"] = str(directory)
    try:
        import llama_cpp
    except OSError as exc:  # the CDLL load itself failed
        raise LibraryError(f"could not load libllama from {directory}: {exc}") from exc
    from . import compat

    compat.check_version(llama_cpp)
    lib = compat.shared_library(llama_cpp.llama_cpp)
    if not hasattr(lib, "llama_self_extend_api_version"):
        raise LibraryError(f"the loaded libllama ({getattr(lib, '_name', '?')}) has no Self-Extend API: unset "
                           "LLAMA_CPP_LIB_PATH (selfext points llama_cpp at its own library)")
    return llama_cpp
