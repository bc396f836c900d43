"""`selfext rpc-server`: lend this host's devices to selfext on another host (llama.cpp's RPC server)."""

from __future__ import annotations

import os
import socket
import sys
from typing import Optional

import typer
from typing_extensions import Annotated

from .errors import handle_errors, hint
from .options import Threads, example

EPILOG = example("selfext rpc-server --host 192.168.1.20 --port 50052 -t 8\n"
                 "selfext run model.gguf --rpc 192.168.1.20:50052 -ngl 99    # the other host")

Host = Annotated[str, typer.Option("--host", "-H", metavar="ADDRESS", help="Address to listen on. RPC has no authentication: bind "
                                                         "to a private network only.")]
Port = Annotated[int, typer.Option("--port", "-p", metavar="PORT", min=1, max=65535, help="Port to listen on.")]
Device = Annotated[Optional[str], typer.Option(
    "--device", "-d", metavar="DEVICES", show_default=False,
    help="Devices to serve, comma-separated (e.g. CUDA0,CUDA1). Default: the GPUs, else the CPU.")]
Cache = Annotated[bool, typer.Option("--cache", "-c", help="Keep received weights in llama.cpp's cache directory "
                                                           "(faster reloads of the same model).")]


@handle_errors
def rpc_server(
    host: Host = "127.0.0.1",
    port: Port = 50052,
    threads: Threads = None,
    device: Device = None,
    cache: Cache = False,
) -> None:
    """Serve this host's devices to `selfext run/serve/eval --rpc HOST:PORT` on another host, in the foreground.

    It runs the ggml-rpc-server built with selfext (same patched llama.cpp: other builds are refused at the
    hello). It serves one client at a time; Ctrl-C stops it. Its log goes to stderr.
    """
    from selfext_cpp.errors import ServerError
    from selfext_cpp.rpc import server_program

    program = server_program()
    try:  # the program takes IPv4 addresses only
        address = socket.gethostbyname(host)
    except OSError:
        raise ServerError(f"cannot resolve --host {host} to an IPv4 address") from None
    if not address.startswith("127."):
        hint(f"warning: RPC has no authentication or encryption: anyone who reaches {host}:{port} can use this "
             "host's devices and read the tensors sent to it; serve a private network only")
    try:  # a busy port: one line now, rather than the program's own message
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address, port))
    except OSError as exc:
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
    args = [str(program), "--host", address, "--port", str(port), "--threads", str(threads or os.cpu_count() or 1)]
    if device:
        args += ["--device", device]
    if cache:
        args.append("--cache")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(2, 1)  # stdout is for results: the server has none, its log goes to stderr
    os.execv(str(program), args)  # the server itself, in the foreground: its pid is ours, signals reach it
