"""`selfext pull`: download a GGUF model from the Hugging Face Hub into its cache."""

from __future__ import annotations

import json

import typer
from typing_extensions import Annotated

from .errors import handle_errors, stderr_is_tty
from .options import Json, Verbose, example

EPILOG = example("selfext pull HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q8_0")

HubRefArg = Annotated[str, typer.Argument(
    metavar="REF", show_default=False,
    help="owner/repo/file.gguf, owner/repo:QUANT (e.g. :Q4_K_M; all shards of a split model), or owner/repo when it "
         "holds one GGUF.")]


@handle_errors
def pull(ref: HubRefArg, json_out: Json = False, verbose: Verbose = False) -> None:
    """Download a GGUF model from the Hugging Face Hub into its cache and print its local path.

    Downloads resume and a file appears in the cache only once complete (huggingface_hub does both).

    HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN (or 'hf auth login') apply. `selfext run REF` downloads too.

    Exit status: 0 success, 1 download error (not found, network, cache not writable), 2 invalid reference.
    """
    from selfext_cpp import hub

    parsed = hub.parse_ref(ref)
    paths = hub.download(parsed, progress=verbose or stderr_is_tty())
    if json_out:
        typer.echo(json.dumps({"ref": ref, "repo_id": parsed.repo_id, "path": str(paths[0]),
                               "files": [str(p) for p in paths]}))
    else:
        typer.echo(str(paths[0]))
