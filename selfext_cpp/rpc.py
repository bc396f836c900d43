"""Layers on other hosts: llama.cpp's RPC backend (ggml-rpc) under a ``Llama``, and the server program.

    from selfext_cpp import load
    llm = load("model.gguf", ga_n=4, ga_w=512, n_ctx=16384, n_gpu_layers=99, rpc=["10.0.0.2:50052"])

Each endpoint runs ``selfext rpc-server`` (the ``ggml-rpc-server`` built with this package). The servers'
devices come first in the model's device list, then the local GPUs, as with llama.cpp's ``--rpc``; the CPU
keeps the layers that ``n_gpu_layers`` does not offload. Our patched client (patch 0003) never aborts: an
unreachable server, another protocol version or a server lost mid-run raise :class:`RpcError` here, and every
connect and call has a timeout (``SELFEXT_RPC_CONNECT_TIMEOUT``, default 10 s; ``SELFEXT_RPC_TIMEOUT``, default
600 s: the longest a server may stay silent, so also the longest graph it may compute).
"""

from __future__ import annotations

import ctypes
import functools
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._lib import lib_dir, load_llama_cpp
from .errors import LibraryError, ParameterError, RpcError

if TYPE_CHECKING:
    from llama_cpp import Llama

DEFAULT_PORT = 50052
SERVER_PROGRAM = "ggml-rpc-server.exe" if sys.platform == "win32" else "ggml-rpc-server"
DEVICE_GPU, DEVICE_IGPU = 1, 2  # enum ggml_backend_dev_type
_ENDPOINT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^\s:,\[\]]+):(?P<port>\d{1,5})$")


def parse_endpoints(spec: str | Sequence[str]) -> list[str]:
    """HOST:PORT endpoints from ``"h1:p1,h2:p2"`` or a list of them, checked; ParameterError otherwise."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    endpoints = [item.strip() for item in items if item and item.strip()]
    if not endpoints:
        raise ParameterError("{rpc} needs at least one HOST:PORT")
    for ep in endpoints:
        m = _ENDPOINT.match(ep)
        if not m or not 0 < int(m.group("port")) < 65536:
            raise ParameterError(f"{{rpc}}: '{ep}' is not HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})")
    if len(set(endpoints)) != len(endpoints):
        raise ParameterError("{rpc} names the same server twice")
    return endpoints


def server_program() -> Path:
    """The ``ggml-rpc-server`` built with this package's libraries (LibraryError when the build has none)."""
    path = lib_dir() / SERVER_PROGRAM
    if not path.exists():
        raise LibraryError(f"no RPC server program at {path}: this build has no RPC backend (rebuild without "
                           "-DGGML_RPC=OFF)")
    return path


@functools.lru_cache(maxsize=1)
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml-rpc, libggml) with the prototypes we call; libllama is loaded first, so they are the ones it uses."""
    load_llama_cpp()
    suffix = {"win32": ".dll", "darwin": ".dylib"}.get(sys.platform, ".so")
    prefix = "" if sys.platform == "win32" else "lib"
    path = lib_dir() / f"{prefix}ggml-rpc{suffix}"
    try:
        rpc = ctypes.CDLL(str(path))
        ggml = ctypes.CDLL(str(lib_dir() / f"{prefix}ggml{suffix}"))
    except OSError as exc:
        raise LibraryError(f"cannot load the RPC backend {path}: {exc} (rebuild without -DGGML_RPC=OFF)") from exc
    if not hasattr(rpc, "ggml_backend_rpc_last_error"):
        raise LibraryError(f"{path} is not selfext's RPC backend: reinstall selfext")
    p, sz = ctypes.c_void_p, ctypes.c_size_t
    for lib, name, args, res in [
        # ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
        (rpc, "ggml_backend_rpc_add_server", [ctypes.c_char_p], p),
        # uint64_t ggml_backend_rpc_error_count(void);
        (rpc, "ggml_backend_rpc_error_count", [], ctypes.c_uint64),
        # const char * ggml_backend_rpc_last_error(void);
        (rpc, "ggml_backend_rpc_last_error", [], ctypes.c_char_p),
        # size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg);
        (ggml, "ggml_backend_reg_dev_count", [p], sz),
        # ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index);
        (ggml, "ggml_backend_reg_dev_get", [p, sz], p),
        # size_t ggml_backend_dev_count(void); ggml_backend_dev_t ggml_backend_dev_get(size_t index);
        (ggml, "ggml_backend_dev_count", [], sz),
        (ggml, "ggml_backend_dev_get", [sz], p),
        # enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);
        (ggml, "ggml_backend_dev_type", [p], ctypes.c_int),
    ]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return rpc, ggml


def error_count() -> int:
    """How many RPC failures this process has seen (connect, hello, a lost server)."""
    return int(_libs()[0].ggml_backend_rpc_error_count())


def last_error() -> str:
    """The latest RPC failure, one line naming the server; "" when none."""
    return (_libs()[0].ggml_backend_rpc_last_error() or b"").decode("utf-8", errors="replace")


def server_devices(endpoints: Sequence[str]) -> list[int]:
    """The devices (``ggml_backend_dev_t``) of each server, in order; RpcError when one cannot be used."""
    rpc, ggml = _libs()
    devices: list[int] = []
    for ep in endpoints:
        before = error_count()
        reg = rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg or error_count() != before:
            raise RpcError(last_error() if error_count() != before else f"RPC server {ep} offers no device")
        devices += [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    return devices


def local_gpus() -> list[int]:
    """This host's GPUs as llama.cpp picks them by default: discrete ones, else the integrated ones."""
    _, ggml = _libs()
    devices = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    gpus = [d for d in devices if ggml.ggml_backend_dev_type(d) == DEVICE_GPU]
    return gpus or [d for d in devices if ggml.ggml_backend_dev_type(d) == DEVICE_IGPU]


def check(since: int) -> None:
    """Raise RpcError when an RPC failure happened after ``error_count()`` was ``since``."""
    if error_count() != since:
        raise RpcError(last_error())


@contextmanager
def model_devices(endpoints: Sequence[str]) -> Iterator[int]:
    """While open, a ``Llama`` built here places its offloaded layers on the servers' devices, then the local
    GPUs (``llama_model_params.devices``); yields ``error_count()`` after connecting, for :func:`check`.

    llama-cpp-python 0.3.36 has no way to pass devices (its ``rpc_servers`` setting is dropped), so this
    replaces ``llama_model_default_params``, which ``Llama.__init__`` calls, for the duration.
    """
    llama_cpp = load_llama_cpp().llama_cpp
    devices = server_devices(endpoints) + local_gpus()
    array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)  # NULL-terminated
    original = llama_cpp.llama_model_default_params

    def default_params() -> Any:
        params = original()
        params.devices = ctypes.cast(array, ctypes.c_void_p).value
        return params

    _kept.append(array)  # llama_model_params keeps the pointer; one small array per load, for the process
    llama_cpp.llama_model_default_params = default_params
    try:
        yield error_count()
    finally:
        llama_cpp.llama_model_default_params = original


_kept: list[Any] = []


def guard(llm: Llama, since: int) -> Llama:
    """Make ``llm.eval`` (prefill and every generated token) raise RpcError once an RPC server is lost.

    A lost server completes the decode in flight with zeroed outputs (and every later one fails). llama_decode
    returns before an RPC server has answered, so each eval waits for the answers (``llama_synchronize``, which
    sampling would do next anyway) and checks: such logits are never sampled.
    """
    check(since)
    evaluate = llm.eval
    synchronize = load_llama_cpp().llama_cpp.llama_synchronize

    @functools.wraps(evaluate)
    def eval_checked(tokens: Sequence[int]) -> None:
        try:
            evaluate(tokens)
        except RuntimeError:  # llama_decode failed: say why when an RPC server is the cause
            check(since)
            raise
        synchronize(llm.ctx)
        check(since)

    llm.eval = eval_checked  # type: ignore[method-assign]
    return llm


def build(endpoints: str | Sequence[str], make: Callable[[], Llama]) -> Llama:
    """``make()`` (which builds a ``Llama``) with its offloaded layers on the RPC servers, guarded."""
    with model_devices(parse_endpoints(endpoints)) as since:
        try:
            llm = make()
        except ValueError:
            check(since)  # a server lost during the load is the cause to report
            raise
    return guard(llm, since)


def load_llama(endpoints: str | Sequence[str], model_path: str, **llama_kwargs: Any) -> Llama:
    """``llama_cpp.Llama(model_path, **llama_kwargs)`` with its offloaded layers on the RPC servers."""
    llama_cpp = load_llama_cpp()
    return build(endpoints, lambda: llama_cpp.Llama(model_path, **llama_kwargs))
