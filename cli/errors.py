"""How failures reach the user: one line on stderr and an exit code (0 ok, 1 runtime, 2 usage, 130 Ctrl-C)."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

import typer
from typer.core import TyperGroup

F = TypeVar("F", bound=Callable[..., Any])
# click's exception classes, whether typer vendors click (>= 0.22) or imports it
_CLICK_ERRORS = {c.__name__: c for c in typer.BadParameter.__mro__}
UsageError, ClickException = _CLICK_ERRORS["UsageError"], _CLICK_ERRORS["ClickException"]


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print ``selfext: error: message`` on stderr and return the Exit to raise."""
    typer.echo(f"selfext: error: {message}", err=True)
    return typer.Exit(code)


# how the command line spells the library's parameters (selfext_cpp.errors.PARAMETERS) in messages
FLAGS = {
    "ga_n": "--ga-n", "ga_w": "--ga-w", "ga_keys": "--ga-keys", "auto": "--auto", "n_ctx": "--ctx-size",
    "n_batch": "--batch-size", "chat": "--chat", "no_chat": "--no-chat", "system": "--system", "text": "text (-f FILE)",
    "lengths": "--lengths", "window": "--window", "n_prompt": "--n-prompt", "n_gen": "--n-gen",
    "repeats": "--repeats", "depths": "--depths", "logprobs": "--logprobs", "host": "--host", "port": "--port",
    "plot": "--plot", "parallel": "--parallel", "rpc": "--rpc",
}
USAGE = 2  # exit status of a usage error (ParameterError); every other error exits 1


def handle_errors(fn: F | None = None, *, flags: dict[str, str] | None = None) -> Any:
    """Turn SelfextError, OSError and Ctrl-C into one line + exit code; tracebacks only with SELFEXT_DEBUG=1.

    Library messages name parameters; they are shown with FLAGS, updated by ``flags`` for this command."""
    names = {**FLAGS, **(flags or {})}

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from selfext_cpp.errors import ParameterError, SelfextError

            debug = os.environ.get("SELFEXT_DEBUG") == "1"
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except KeyboardInterrupt:
                typer.echo("selfext: interrupted", err=True)
                raise typer.Exit(130)
            except SelfextError as exc:
                if debug:
                    raise
                raise fail(exc.render(names), USAGE if isinstance(exc, ParameterError) else 1)
            except Exception as exc:  # anything unexpected still ends as one line
                if debug:
                    raise
                raise fail(f"{type(exc).__name__}: {exc} (set SELFEXT_DEBUG=1 for the traceback)", 1)

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


class OneLineErrors(TyperGroup):
    """The root command group: click's own errors (a bad value, an unknown option, a missing argument) end as one
    line too, ``selfext: error: ... (see 'selfext run --help')`` with click's exit code (2), not four."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # typer.Exit's code, or a return value
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `selfext`: the help itself
                exc.show()
                sys.exit(exc.exit_code)
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            typer.echo(f"selfext: error: {exc.format_message().rstrip('.')}{where}", err=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:
            typer.echo(f"selfext: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("selfext: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def hint(message: str) -> None:
    """A one-line note on stderr (``selfext: message``): default model, --auto's choice and the like."""
    typer.echo(f"selfext: {message}", err=True)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
