"""llama.cpp's own server (llama-server) built from our patched tree: many users at once, Self-Extend on every slot.

    from selfext_cpp import llama_server
    cfg = llama_server.config("model.gguf", parallel=4, auto_max_ctx=16384)
    with llama_server.start(cfg, port=0) as srv:      # blocks until /health answers
        print(srv.url)                                # http://127.0.0.1:PORT

llama-server is built only with ``CMAKE_ARGS="-DSELFEXT_SERVER=ON ..." pip install .`` (it roughly triples the
build time) and installed as ``selfext_cpp/bin/llama-server``. Its slots share one context (continuous batching);
G and W are per context, so every slot uses the same, set by patch 0004 right after the context is created (and
again when the server wakes from sleep). Each slot holds the per-request context N that :func:`config` plans:
``-c parallel*N``, one KV stream per slot, and the slot cap (the trained context upstream) raised to N.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError, ParameterError, ServerError, UnsupportedModelError

BINARY_NAME = "llama-server.exe" if sys.platform == "win32" else "llama-server"
INSTALL_HINT = ('build it: CMAKE_ARGS="-DSELFEXT_SERVER=ON -DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" '
                'pip install "selfext[smollm2]" (see the README, Server)')


def binary() -> Path | None:
    """Our llama-server: ``SELFEXT_LLAMA_SERVER``, else the one installed in ``selfext_cpp/bin``; None if absent."""
    override = os.environ.get("SELFEXT_LLAMA_SERVER")
    if override:
        return Path(override) if Path(override).exists() else None
    here = Path(__file__).resolve().parent / "bin" / BINARY_NAME
    if here.exists():
        return here
    from importlib import metadata

    try:
        files = metadata.distribution("selfext").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:  # an editable install keeps the built files apart from the sources
        if f.parent.name == "bin" and f.name == BINARY_NAME:
            path = Path(str(f.locate())).resolve()
            if path.exists():
                return path
    return None


@dataclass(frozen=True)
class Config:
    """What one llama-server serves: a model, N slots of ``n_ctx_slot`` tokens each, Self-Extend G and W."""

    model: Path
    parallel: int
    n_ctx_slot: int  # tokens per request (prompt + completion), per slot
    n_ctx_train: int
    ga_n: int = 1
    ga_w: int = 0
    ga_keys: str = "auto"  # the fused op's grouped keys, passed as LLAMA_SELF_EXTEND_KEYS (llama-server has no flag)
    threads: int | None = None
    n_gpu_layers: int = 0
    flash_attn: bool = True
    alias: str | None = None
    api_key: str | None = None
    extra: tuple[str, ...] = field(default=())  # further llama-server options, verbatim

    def args(self, host: str, port: int) -> list[str]:
        """llama-server's command line (without the binary)."""
        a = ["-m", str(self.model), "--parallel", str(self.parallel), "--no-kv-unified",
             "-c", str(self.parallel * self.n_ctx_slot), "--kv-unified-per-slot", str(self.n_ctx_slot),
             "--host", host, "--port", str(port), "-ngl", str(self.n_gpu_layers),
             "-fa", "on" if self.flash_attn else "off", "--no-webui", "--metrics"]
        if self.ga_n > 1:
            a += ["--ga-n", str(self.ga_n), "--ga-w", str(self.ga_w)]
        if self.threads:
            a += ["-t", str(self.threads), "-tb", str(self.threads)]
        if self.alias:
            a += ["--alias", self.alias]
        if self.api_key:
            a += ["--api-key", self.api_key]
        return a + list(self.extra)


def config(model: str | Path, *, parallel: int, ga_n: int | None = None, ga_w: int | None = None, n_ctx: int = 0,
           auto_max_ctx: int | None = None, **options: Any) -> Config:
    """The llama-server setting for ``parallel`` slots of ``model``, G/W and tokens per slot planned as for
    ``selfext serve`` (``n_ctx`` or ``auto_max_ctx`` are tokens per request, i.e. per slot).

    Other keyword arguments are :class:`Config` fields (ga_keys, threads, n_gpu_layers, flash_attn, alias, api_key,
    extra). Raises ParameterError, CapacityError, ModelError, UnsupportedModelError.
    """
    from .engine import check_context_memory, check_keys, serving_plan
    from .models import inspect

    if parallel < 1:
        raise ParameterError(f"{{parallel}} must be >= 1, got {parallel}")
    check_keys(options.get("ga_keys", "auto"))
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"no model file at {path}")
    meta = inspect(path)  # the header only
    params, n_ctx_slot = serving_plan(meta.n_ctx_train, ga_n=ga_n, ga_w=ga_w, n_ctx=n_ctx,
                                      auto_max_ctx=auto_max_ctx)
    check_context_memory(meta, n_ctx_slot, slots=parallel, n_gpu_layers=options.get("n_gpu_layers", 0),
                         rpc="--rpc" in options.get("extra", ()))
    if params.enabled and not meta.self_extend_supported:
        raise UnsupportedModelError(f"Self-Extend is not available for {path}: {meta.self_extend_status}; "
                                    "serve it without {ga_n}/{auto}")
    return Config(model=path, parallel=parallel, n_ctx_slot=n_ctx_slot, n_ctx_train=meta.n_ctx_train,
                  ga_n=params.ga_n, ga_w=params.ga_w, **options)


class Running:
    """A llama-server process: its URL once ready, the tail of its log, and how to stop it."""

    def __init__(self, proc: subprocess.Popen[bytes], echo: bool) -> None:
        self.proc = proc
        self.url = ""
        self.tail: deque[str] = deque(maxlen=400)
        self._echo = echo
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            if "listening on http" in line and not self.url:
                self.url = line.rsplit("listening on ", 1)[1].strip()
            if self._echo:
                print(line, file=sys.stderr, flush=True)

    def errors(self) -> str:
        """The error lines of its log so far (llama.cpp marks them 'E '), else its last lines."""
        lines = [line for line in self.tail if " E " in f" {line[:24]}" or "error" in line.lower()]
        return "\n".join(lines[-6:] or list(self.tail)[-6:])

    def wait_ready(self, timeout: float) -> None:
        """Until /health answers 200. Raises ServerError when the process exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise ServerError(f"llama-server exited with code {self.proc.returncode}:\n{self.errors()}")
            if self.url:
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                        if resp.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass  # 503 while loading, or not accepting yet
            time.sleep(0.1)
        self.stop()
        raise ServerError(f"llama-server was not ready in {timeout:.0f} s:\n{self.errors()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # its own clean shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(cfg: Config, *, host: str = "127.0.0.1", port: int = 8080, verbose: bool = False,
          timeout: float = 600.0) -> Running:
    """Start llama-server for ``cfg`` and return once it answers /health (``port`` 0: any free port).

    Its log goes to stderr with ``verbose``; otherwise only its error lines, in the ServerError when it fails.
    """
    from .engine import keys_environ

    exe = binary()
    if exe is None:
        raise ServerError(f"llama-server is not built into this install; {INSTALL_HINT}")
    # its own session: a Ctrl-C in the terminal reaches us, and stop() passes it on
    proc = subprocess.Popen([str(exe), *cfg.args(host, port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=keys_environ(cfg.ga_keys))
    running = Running(proc, echo=verbose)
    if port:
        running.url = f"http://{host}:{port}"
    try:
        running.wait_ready(timeout)
    except BaseException:  # not ready, or interrupted while loading
        running.stop()
        raise
    return running
