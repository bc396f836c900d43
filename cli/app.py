"""The `selfext` Typer app: registers the commands, nothing else."""

from __future__ import annotations

import typer

from . import eval as eval_cmd
from . import info, pull, rpc_server, run, serve
from .errors import OneLineErrors
from .options import example

# rich_markup_mode=None: click's plain help (as `hf` has), options and their help side by side at 80 columns,
# where typer's rich panels give each option's help a column of ~15 characters
app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Exact Self-Extend for llama.cpp models: read far past the trained context.",
                  epilog=example('selfext run -p "The capital of France is" -n 12 --temp 0 --no-chat'))


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


app.command("run", epilog=run.EPILOG)(run.run)
app.command("pull", epilog=pull.EPILOG)(pull.pull)
app.command("info", epilog=info.EPILOG)(info.info)
app.command("serve", epilog=serve.EPILOG)(serve.serve)
app.command("rpc-server", epilog=rpc_server.EPILOG)(rpc_server.rpc_server)
app.add_typer(eval_cmd.app, name="eval")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
