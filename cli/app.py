"""The `selfext` Typer app: registers the commands, nothing else."""

from __future__ import annotations

import typer

from . import eval as eval_cmd
from . import info, pull, rpc_server, run, serve

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
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


app.command("run")(run.run)
app.command("pull")(pull.pull)
app.command("info")(info.info)
app.command("serve")(serve.serve)
app.command("rpc-server")(rpc_server.rpc_server)
app.add_typer(eval_cmd.app, name="eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
