"""An OpenAI-compatible server with Self-Extend: llama-cpp-python's server on our libllama.

    from selfext_cpp import server
    settings = server.model_settings("model.gguf", auto_max_ctx=16384)
    app = server.create_app(settings, api_key="secret")
    server.run(app, server.bind("127.0.0.1", 8080))

We reuse llama-cpp-python's FastAPI app whole (routes, request types, API key, streaming, one request at a time)
and add what Self-Extend needs, and what a client needs to tell its own mistakes from the server's:

- :class:`SelfExtendProxy`: its ``LlamaProxy``, enabling Self-Extend on each ``Llama`` it builds and capping the
  context llama-cpp-python enforces at what Self-Extend reaches (llama.cpp pads ``n_ctx`` up to 256s);
- 400 answers (:func:`client_error`, answered first on every route: ``compat.answer_route_errors_first``): ``context_length_exceeded`` naming that reach, invalid requests, logprobs
  on a server without them; for streaming requests too (:class:`EarlyErrors`). llama-cpp-python answers most
  of these with 500;
- ``GET /health`` with the setting in force.

Their app keeps its state in module globals (one app per process); so does this module (:data:`_loaded`).
"""

from __future__ import annotations

import copy
import json
import re
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import compat
from ._lib import load_llama_cpp
from .engine import (SelfExtend, check_context_memory, check_keys, enable_self_extend, last_llama_error, n_ctx_train,
                     self_extend_keys, serving_plan, set_llama_log, set_self_extend_keys)
from .errors import ModelError, SelfextError, ServerError, UnsupportedModelError


load_llama_cpp()  # llama_cpp must bind our libllama before llama_cpp.server imports it
try:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from llama_cpp import Llama
    from llama_cpp.server import app as base
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from pydantic import Field
except ModuleNotFoundError as exc:
    raise ServerError(f"the server needs llama-cpp-python's server extra ({exc.name} is missing): "
                      "pip install 'selfext[server]'") from exc


@dataclass(frozen=True)
class Serving:
    """A loaded model: its Self-Extend setting, trained context, and the context served per request."""

    model: str  # the id clients see in /v1/models
    self_extend: SelfExtend
    n_ctx_train: int
    n_ctx: int  # prompt + completion tokens of one request
    keys: str | None = None  # the fused op's grouped keys (self_extend_keys)

    @property
    def capacity(self) -> int:
        return self.self_extend.capacity(self.n_ctx_train)

    def to_dict(self) -> dict[str, Any]:
        se = self.self_extend
        return {"model": self.model, "n_ctx": self.n_ctx, "n_ctx_train": self.n_ctx_train,
                "self_extend": {"ga_n": se.ga_n, "ga_w": se.ga_w, "ga_keys": self.keys, "capacity": self.capacity}
                if se.enabled else None}


_loaded: Serving | None = None  # the model the proxy holds now (it holds one at a time)
_names: dict[str, str] = {}  # create_app's names


class SelfExtendModelSettings(ModelSettings):
    """llama-cpp-python's ModelSettings plus Self-Extend's group size and window."""

    ga_n: int = Field(default=1, ge=1, description="Self-Extend group size G (1 = off).")
    ga_w: int = Field(default=0, ge=0, description="Self-Extend neighbour window W, in tokens.")
    ga_keys: str = Field(default="auto", description="The fused op's grouped keys: auto, steps, table or cache.")


def model_settings(model_path: str | Path, *, ga_n: int | None = None, ga_w: int | None = None, ga_keys: str = "auto",
                   n_ctx: int = 0, auto_max_ctx: int | None = None, **settings: Any) -> SelfExtendModelSettings:
    """Settings that serve ``model_path`` with G, W and the context from :func:`serving_plan`, read from its
    header, and the form of the grouped keys ``ga_keys`` (:func:`selfext_cpp.engine.set_self_extend_keys`).

    Other keyword arguments are ModelSettings fields: n_threads, n_gpu_layers, chat_format, model_alias, ...
    """
    from .models import inspect

    check_keys(ga_keys)
    meta = inspect(model_path)  # the header only: milliseconds
    params, context = serving_plan(meta.n_ctx_train, ga_n=ga_n, ga_w=ga_w, n_ctx=n_ctx, auto_max_ctx=auto_max_ctx)
    check_context_memory(meta, context, n_gpu_layers=settings.get("n_gpu_layers", 0),
                         rpc=bool(settings.get("rpc_servers")))
    if params.enabled and not meta.self_extend_supported:
        raise UnsupportedModelError(f"Self-Extend is not available for {meta.path}: {meta.self_extend_status}; "
                                    "serve it without {ga_n}/{auto}")
    settings.setdefault("model_alias", Path(model_path).name)
    return SelfExtendModelSettings(model=str(model_path), ga_n=params.ga_n, ga_w=params.ga_w, ga_keys=ga_keys,
                                   n_ctx=context, **settings)


class SelfExtendProxy(LlamaProxy):
    """llama-cpp-python's LlamaProxy, with Self-Extend on every Llama it builds."""

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> Llama:
        global _loaded
        params = SelfExtend(getattr(settings, "ga_n", 1), getattr(settings, "ga_w", 0))  # before the slow load
        set_llama_log(settings.verbose)  # keeps llama.cpp's error lines for the message below
        try:
            if settings.rpc_servers:  # llama-cpp-python drops this setting; ours places layers on the servers
                from . import rpc
                llm = rpc.build(settings.rpc_servers, lambda: LlamaProxy.load_llama_from_model_settings(settings))
            else:
                llm = LlamaProxy.load_llama_from_model_settings(settings)
        except ValueError as exc:
            raise ModelError(f"llama.cpp could not load {settings.model}: {last_llama_error() or exc}") from exc
        try:
            set_self_extend_keys(llm, getattr(settings, "ga_keys", "auto"))
            enable_self_extend(llm, params.ga_n, params.ga_w, warn_slow=False)
            trained = n_ctx_train(llm)
            wanted = settings.n_ctx or trained  # llama-cpp-python's n_ctx=0: the trained context
            params.check(trained, wanted)
            # llama-cpp-python rejects prompts of _n_ctx tokens or more and stops completions there; llama.cpp
            # padded the real context (to 256s), which may reach past what Self-Extend serves
            compat.set_context_limit(llm, min(wanted, llm.n_ctx()))
        except BaseException:
            llm.close()
            raise
        _loaded = Serving(settings.model_alias or settings.model, params, trained, compat.context_limit(llm),
                          self_extend_keys(llm))
        return llm


def context_length_error(n_prompt: int, param: str) -> tuple[int, dict[str, Any]]:
    """The 400 answer to a prompt of ``n_prompt`` tokens that leaves no room for a completion."""
    s = loaded()
    noun = "messages" if param == "messages" else "prompt"
    se = s.self_extend
    if not se.enabled:
        reach = f"Self-Extend is off (the model was trained on {s.n_ctx_train} tokens)."
    elif s.n_ctx < s.capacity:
        reach = (f"The server was started for {s.n_ctx} ({{n_ctx}} or {{auto}}); Self-Extend "
                 f"({se.describe()}) would reach {s.capacity}.")
    else:
        reach = (f"Self-Extend ({se.describe()}) stretches the model's trained {s.n_ctx_train} tokens to a "
                 f"capacity of {s.capacity}, and no further.")
    message = (f"This model's maximum context length is {s.n_ctx} tokens, prompt and completion together; "
               f"however your {noun} came to {n_prompt} tokens. {reach} Shorten the {noun}, or restart the "
               "server with a larger {auto}.")
    return 400, _error(_say(message), noun, "context_length_exceeded")


# what llama-cpp-python raises for requests the loaded model cannot take
CONTEXT_EXCEEDED = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
NO_LOGPROBS = re.compile(r"logprobs is not supported for models created with logits_all=False")


def client_error(exc: BaseException, path: str) -> tuple[int, dict[str, Any]] | None:
    """The 400 answer when ``exc``, raised serving ``path``, is the client's doing; None when it is not.

    llama-cpp-python answers all of these with 500 but a prompt beyond the context (a 400 that names no
    Self-Extend capacity), and the openai client retries a 500: same request, same failure, three times.
    """
    param = "messages" if path.rstrip("/").endswith("chat/completions") else "prompt"
    if match := CONTEXT_EXCEEDED.search(str(exc)):
        return context_length_error(int(match.group(1)), param)
    if NO_LOGPROBS.search(str(exc)):
        return 400, _error(_say("logprobs are off on this server: restart it with {logprobs}"), "logprobs")
    if isinstance(exc, json.JSONDecodeError):
        return 400, _error(f"the request body is not JSON: {exc}")
    if isinstance(exc, UnicodeDecodeError):  # Starlette decodes the body before json.loads sees it
        return 400, _error(f"the request body is not UTF-8 JSON: byte {exc.start} is not UTF-8")
    if isinstance(exc, RequestValidationError):
        problems = [(".".join(str(x) for x in e["loc"] if x != "body"), e["msg"]) for e in exc.errors()]
        text = "; ".join(f"{where}: {msg}" if where else msg for where, msg in problems[:3])
        return 400, _error(f"invalid request: {text}", problems[0][0] if problems else None)
    return None


def _say(template: str) -> str:
    """A message for clients, naming the server's options as the front end that started it spells them."""
    return SelfextError(template).render(_names)


def _error(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": "invalid_request_error", "param": param, "code": code}


class EarlyErrors:
    """ASGI middleware: an error raised before a response started becomes an OpenAI-style JSON error.

    llama-cpp-python's streaming routes answer ``200 text/event-stream`` before the model has seen the prompt,
    so an error on the first token (a prompt beyond the context) would end a 200 stream with nothing in it.
    Such a response's headers are held back until its first event, so that the error is still answered as
    without streaming. Malformed JSON also escapes the routes' own error handling, and is answered here.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        held: list[dict[str, Any]] = []
        sent = False

        async def send_when_ready(message: dict[str, Any]) -> None:
            nonlocal sent
            if not sent and (held or _is_event_stream_start(message)) and not message.get("body"):
                held.append(message)  # the start, and empty bodies (the end of a stream cut by an error)
                return
            for m in held:
                await send(m)
            held.clear()
            sent = True
            await send(message)

        try:
            await self.app(scope, receive, send_when_ready)
        except Exception as exc:
            if sent:
                raise
            answer = client_error(exc, scope["path"])
            if answer is None:  # as llama-cpp-python's RouteErrorHandler answers errors without streaming
                print(f"Exception: {exc}", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                answer = 500, {"message": str(exc), "type": "internal_server_error", "param": None, "code": None}
            status, error = answer
            await JSONResponse({"error": error}, status_code=status)(scope, receive, send)
            return
        for m in held:  # a stream that ended without an event
            await send(m)


def _is_event_stream_start(message: dict[str, Any]) -> bool:
    if message["type"] != "http.response.start":
        return False
    headers = dict(message.get("headers") or [])
    return headers.get(b"content-type", b"").startswith(b"text/event-stream")


def create_app(settings: ModelSettings | list[ModelSettings], *, api_key: str | None = None,
               names: Mapping[str, str] | None = None) -> FastAPI:
    """llama-cpp-python's app serving ``settings`` (the first model is the default) with Self-Extend.

    Loads the default model now. Requests run one at a time; a request that arrives during a stream waits
    for it rather than cutting it short. With ``api_key``, every route but /health needs
    ``Authorization: Bearer <api_key>``. ``names``: how answers to clients spell the server's options
    (:meth:`SelfextError.render`; e.g. the command line's flags).
    """
    global _names
    _names = dict(names or {})
    models = settings if isinstance(settings, list) else [settings]
    server_settings = ServerSettings(api_key=api_key, interrupt_requests=False)
    with compat.proxy_class(SelfExtendProxy):
        app = base.create_app(server_settings=server_settings, model_settings=models)
    compat.answer_route_errors_first(client_error)
    app.add_middleware(EarlyErrors)
    app.add_api_route("/health", health, methods=["GET"], summary="Health", tags=["Extras"])
    return app


async def health() -> dict[str, Any]:
    """Ready (the model is loaded), with the Self-Extend setting and the context served."""
    return {"status": "ok", **loaded().to_dict()}


def loaded() -> Serving:
    """The model the server holds now."""
    if _loaded is None:
        raise ServerError("no model is loaded: call create_app first")
    return _loaded


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port), before the slow model load so that a busy port fails
    at once. Connections are refused until :func:`run` listens on it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServerError(f"cannot resolve {{host}} {host}: {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another {{port}}") from exc
    return sock


def url(sock: socket.socket) -> str:
    """http://host:port of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app: FastAPI, sock: socket.socket, *, verbose: bool = False) -> None:
    """Serve ``app`` on ``sock`` until interrupted (uvicorn; request logs only when ``verbose``)."""
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout is for results; a server has none
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            log_config=log_config)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal, but that re-raise can be
    # absorbed by asyncio's own SIGINT handling; a stop by signal must still end as an interrupt (exit 130)
    if server.should_exit:
        raise KeyboardInterrupt
