"""`selfext serve`: an OpenAI-compatible server (llama-cpp-python's) with Self-Extend on."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from .errors import FLAGS, handle_errors, stderr_is_tty
from .options import FlashAttn, GaKeys, GaN, GaW, GpuLayers, ModelArg, Rpc, Threads, Verbose, example

EPILOG = example("selfext serve model.gguf --auto-max-ctx 16384 --port 8080")

AutoMaxCtx = Annotated[Optional[int], typer.Option(
    "--auto-max-ctx", metavar="N", min=1, show_default=False,
    help="Serve N tokens per request (prompt + completion): G and W are chosen for N from the model's trained "
         "context.")]
ServeCtx = Annotated[int, typer.Option(
    "--ctx-size", "-c", metavar="N", min=0,
    help="Tokens per request, prompt + completion (0 = all that --ga-n/--ga-w reach).")]
Host = Annotated[str, typer.Option("--host", metavar="ADDRESS", help="Address to listen on.")]
Port = Annotated[int, typer.Option("--port", metavar="PORT", min=0, max=65535,
                                   help="Port to listen on (0 = any free port).")]
ApiKey = Annotated[Optional[str], typer.Option(
    "--api-key", metavar="KEY", envvar="SELFEXT_API_KEY", show_default=False,
    help="Require 'Authorization: Bearer KEY' on every route but /health.")]
ChatFormat = Annotated[Optional[str], typer.Option(
    "--chat-format", metavar="NAME", show_default=False,
    help="llama-cpp-python chat format (e.g. chatml). Default: the model's own chat template.")]
Alias = Annotated[Optional[str], typer.Option(
    "--alias", "-a", metavar="NAME", show_default=False, help="Model id in /v1/models. Default: the GGUF file name.")]
Logprobs = Annotated[bool, typer.Option(
    "--logprobs", help="Allow logprobs in requests (keeps n_ctx x vocabulary logits in memory).")]
Parallel = Annotated[Optional[int], typer.Option(
    "--parallel", "-np", metavar="N", min=1, show_default=False,
    help="Serve N requests at once with llama.cpp's own server (llama-server; needs the -DSELFEXT_SERVER=ON "
         "build): N slots of the per-request context, continuous batching, Self-Extend on every slot.")]


SERVE_FLAGS = {"auto": "--auto-max-ctx", "n_ctx": "-c"}


@handle_errors(flags=SERVE_FLAGS)
def serve(
    model: ModelArg = None,
    ga_n: GaN = None,
    ga_w: GaW = None,
    ga_keys: GaKeys = "auto",
    auto_max_ctx: AutoMaxCtx = None,
    ctx_size: ServeCtx = 0,
    host: Host = "127.0.0.1",
    port: Port = 8080,
    api_key: ApiKey = None,
    chat_format: ChatFormat = None,
    alias: Alias = None,
    logprobs: Logprobs = False,
    parallel: Parallel = None,
    threads: Threads = None,
    gpu_layers: GpuLayers = 0,
    rpc: Rpc = None,
    flash_attn: FlashAttn = True,
    verbose: Verbose = False,
) -> None:
    """Serve MODEL over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) with Self-Extend.

    Prompts longer than the model's trained context work up to the Self-Extend capacity; longer ones get a
    400 context_length_exceeded error. GET /health reports the setting. Ctrl-C stops the server.

    With --parallel N, llama.cpp's own server answers N requests at once (each with the full per-request
    context); --chat-format then names a llama.cpp chat template, and logprobs are always allowed.
    """
    from selfext_cpp.engine import check_keys

    check_keys(ga_keys)  # before the model is resolved (maybe downloaded)
    if parallel is not None:
        return _serve_parallel(model, parallel, ga_n=ga_n, ga_w=ga_w, ga_keys=ga_keys, auto_max_ctx=auto_max_ctx,
                               n_ctx=ctx_size,
                               host=host, port=port, api_key=api_key, chat_format=chat_format, alias=alias,
                               threads=threads, gpu_layers=gpu_layers, rpc=rpc, flash_attn=flash_attn,
                               verbose=verbose)
    from selfext_cpp import server  # llama_cpp and FastAPI: only when serving

    path = _resolve(model)
    n_threads = threads or os.cpu_count() or 1
    settings = server.model_settings(
        path, ga_n=ga_n, ga_w=ga_w, ga_keys=ga_keys, n_ctx=ctx_size, auto_max_ctx=auto_max_ctx,
        model_alias=alias or path.name,
        chat_format=chat_format, n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=gpu_layers,
        flash_attn=flash_attn, logits_all=logprobs, verbose=verbose, rpc_servers=rpc,
    )  # fmt: skip
    sock = server.bind(host, port)  # a busy port fails now, not after the model load
    try:
        app = server.create_app(settings, api_key=api_key, names={**FLAGS, **SERVE_FLAGS})
    except BaseException:
        sock.close()
        raise
    s = server.loaded()
    se = s.self_extend
    setting = _setting(se.ga_n, se.ga_w)
    typer.echo(f"selfext: serving {s.model} at {server.url(sock)}/v1 ({setting}; {s.n_ctx} tokens per request, "
               f"trained on {s.n_ctx_train})", err=True)
    server.run(app, sock, verbose=verbose)


def _serve_parallel(model: Optional[str], parallel: int, *, ga_n: Optional[int], ga_w: Optional[int], ga_keys: str,
                    auto_max_ctx: Optional[int],
                    n_ctx: int, host: str, port: int, api_key: Optional[str], chat_format: Optional[str],
                    alias: Optional[str], threads: Optional[int], gpu_layers: int, rpc: Optional[str],
                    flash_attn: bool, verbose: bool) -> None:
    """`serve --parallel N`: llama-server with N slots, until Ctrl-C (exit 130) or until it exits."""
    from selfext_cpp import llama_server
    from selfext_cpp.errors import ServerError

    if llama_server.binary() is None:  # before resolving (downloading) the model
        raise ServerError(f"--parallel needs llama-server, which this install lacks; {llama_server.INSTALL_HINT}")
    path = _resolve(model)
    cfg = llama_server.config(
        path, parallel=parallel, ga_n=ga_n, ga_w=ga_w, ga_keys=ga_keys, n_ctx=n_ctx, auto_max_ctx=auto_max_ctx,
        threads=threads or os.cpu_count() or 1, n_gpu_layers=gpu_layers, flash_attn=flash_attn,
        alias=alias or path.name, api_key=api_key,
        extra=(("--chat-template", chat_format) if chat_format else ()) + (("--rpc", rpc) if rpc else ()),
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain `kill` stops llama-server too
    srv = llama_server.start(cfg, host=host, port=port, verbose=verbose)
    try:
        setting = _setting(cfg.ga_n, cfg.ga_w)
        typer.echo(f"selfext: serving {path.name} at {srv.url}/v1 with llama-server, {cfg.parallel} slots "
                   f"({setting}; {cfg.n_ctx_slot} tokens per request, trained on {cfg.n_ctx_train})", err=True)
        code = srv.proc.wait()
    finally:
        srv.stop()
    if code != 0:
        raise ServerError(f"llama-server exited with code {code}:\n{srv.errors()}")


def _setting(ga_n: int, ga_w: int) -> str:
    """How the startup line names the Self-Extend setting, for both engines."""
    return f"Self-Extend --ga-n {ga_n} --ga-w {ga_w}" if ga_n > 1 else "Self-Extend off"


def _resolve(ref: Optional[str]) -> Path:
    from selfext_cpp.hub import resolve_model

    return resolve_model(ref, progress=stderr_is_tty())
