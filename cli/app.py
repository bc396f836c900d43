"""The `selfext` Typer app: registers the commands, nothing else."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Exact Self-Extend for llama.cpp models: read far past the trained context.")


def _version(value: bool) -> None:
    if value:
        from selfext_cpp import __version__
        from selfext_cpp.capi import upstream_commit
        typer.echo(f"selfext {__version__} (llama.cpp {upstream_commit()})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and the pinned llama.cpp commit.")) -> None:
    pass


def main() -> None:
    app()
