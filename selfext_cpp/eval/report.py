"""Results as people read them: rich tables, one JSON document per run, and matplotlib plots (optional extra).

JSON documents (``schema`` names the kind and version; ``complete`` is false after Ctrl-C)::

    {"schema": "selfext.eval.passkey/1", "selfext": "0.1.0", "complete": true,
     "model": {"path": ..., "n_ctx_train": 8192},
     "config": {...the command's options...},
     "settings": [{"mode", "length", "ga_n", "ga_w", "rope_factor"}, ...],
     "results": [{"mode", "length", "n_tokens", "depth", "trial", "key", "key_position", "output", "correct",
                  "ga_n", "ga_w", "rope_factor", "seconds"}, ...],
     "accuracy": [{"mode", "length", "depth", "correct", "trials", "accuracy"}, ...]}
    {"schema": "selfext.eval.ppl/1", ..., "text": {"source", "tokens"},
     "results": [{"mode", "length", "window", "nll", "ppl", "ga_n", "ga_w", "rope_factor", "seconds"}, ...]}
    {"schema": "selfext.eval.speed/1", ..., "results": [{"depth", "flash_attn", "mode", "ga_n", "ga_w",
     "prefill_tps", "decode_tps", "prefill_runs", "decode_runs"}, ...],
     "ratios": [{"depth", "flash_attn", "prefill", "decode"}, ...],
     "best_ratios": [{"depth", "prefill", "decode"}, ...]}   (faster of FA off/on, each side)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SelfextError
from .modes import Setting
from .passkey import TrialResult, accuracy
from .ppl import PplResult
from .speed import SpeedResult, best_ratios, ratios

if TYPE_CHECKING:
    from rich.table import Table

SCHEMA_VERSION = 1


def _header(kind: str, model: dict[str, Any], config: dict[str, Any], complete: bool) -> dict[str, Any]:
    from .. import __version__
    return {"schema": f"selfext.eval.{kind}/{SCHEMA_VERSION}", "selfext": __version__, "complete": complete,
            "model": model, "config": config}


def settings_json(settings: dict[tuple[str, int], Setting]) -> list[dict[str, Any]]:
    return [{"length": n, **s.to_json()} for (_, n), s in settings.items()]


def passkey_document(model: dict[str, Any], config: dict[str, Any], settings: dict[tuple[str, int], Setting],
                     results: Sequence[TrialResult], complete: bool = True) -> dict[str, Any]:
    return {**_header("passkey", model, config, complete), "settings": settings_json(settings),
            "results": [r.to_json() for r in results], "accuracy": accuracy(results)}


def ppl_document(model: dict[str, Any], config: dict[str, Any], text: dict[str, Any],
                 settings: dict[tuple[str, int], Setting], results: Sequence[PplResult],
                 complete: bool = True) -> dict[str, Any]:
    return {**_header("ppl", model, config, complete), "text": text, "settings": settings_json(settings),
            "results": [r.to_json() for r in results]}


def speed_document(model: dict[str, Any], config: dict[str, Any], results: Sequence[SpeedResult],
                   complete: bool = True) -> dict[str, Any]:
    return {**_header("speed", model, config, complete), "results": [r.to_json() for r in results],
            "ratios": ratios(results), "best_ratios": best_ratios(results)}


# -- tables ---------------------------------------------------------------------------------------------------


def _ga(ga_n: int, ga_w: int, factor: float = 1.0) -> str:
    if ga_n > 1:
        return f"G={ga_n} W={ga_w}"
    return f"×{factor:.2f}" if factor > 1.0 else "-"


def passkey_table(results: Sequence[TrialResult], title: str = "passkey accuracy") -> Table:
    """One row per (mode, length), one column per depth, cells "correct/trials"."""
    from rich.table import Table

    depths = sorted({r.depth for r in results})
    table = Table(title=title)
    for name in ("mode", "length", "setting"):
        table.add_column(name)
    for d in depths:
        table.add_column(f"{d * 100:g}%", justify="right")
    table.add_column("all", justify="right")
    rows: dict[tuple[str, int], list[TrialResult]] = {}
    for r in results:
        rows.setdefault((r.mode, r.length), []).append(r)
    order = {m: i for i, m in enumerate(dict.fromkeys(r.mode for r in results))}  # modes as given
    for (mode, n), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])):
        cells = []
        for d in depths:
            hit = [r.correct for r in rs if r.depth == d]
            cells.append(_frac(sum(hit), len(hit)) if hit else "")
        table.add_row(mode, str(n), _ga(rs[0].ga_n, rs[0].ga_w, rs[0].rope_factor), *cells,
                      _frac(sum(r.correct for r in rs), len(rs)))
    return table


def _frac(k: int, n: int) -> str:
    color = "green" if k == n else "red" if k == 0 else "yellow"
    return f"[{color}]{k}/{n}[/{color}]"


def ppl_table(results: Sequence[PplResult], n_ctx_train: int, title: str = "perplexity of the final window"
              ) -> Table:
    """One row per length, one column per mode."""
    from rich.table import Table

    modes = list(dict.fromkeys(r.mode for r in results))
    table = Table(title=title, caption=f"trained context: {n_ctx_train} tokens")
    table.add_column("length", justify="right")
    for m in modes:
        table.add_column(m, justify="right")
    by = {(r.length, r.mode): r for r in results}
    for n in sorted({r.length for r in results}):
        table.add_row(str(n), *(f"{by[(n, m)].ppl:.3f}" if (n, m) in by else "" for m in modes))
    return table


def speed_table(results: Sequence[SpeedResult], title: str = "speed (tokens/s, median)") -> Table:
    """One row per (depth, FA), vanilla and Self-Extend prefill/decode and their ratios."""
    from rich.table import Table

    table = Table(title=title)
    for name in ("depth", "FA", "prefill vanilla", "prefill selfext", "ratio", "decode vanilla",
                 "decode selfext", "ratio"):
        table.add_column(name, justify="right")
    by = {(r.depth, r.flash_attn, r.mode): r for r in results}
    for (depth, fa) in dict.fromkeys((r.depth, r.flash_attn) for r in results):
        v, s = by.get((depth, fa, "vanilla")), by.get((depth, fa, "selfext"))
        table.add_row(str(depth), "on" if fa else "off",
                      f"{v.prefill_tps:.1f}" if v else "", f"{s.prefill_tps:.1f}" if s else "",
                      f"{s.prefill_tps / v.prefill_tps:.2f}" if v and s else "",
                      f"{v.decode_tps:.1f}" if v else "", f"{s.decode_tps:.1f}" if s else "",
                      f"{s.decode_tps / v.decode_tps:.2f}" if v and s else "")
    if len({r.flash_attn for r in results}) > 1:
        for b in best_ratios(results):
            table.add_row(str(b["depth"]), "best", "", "", f"{b['prefill']:.2f}" if b["prefill"] else "",
                          "", "", f"{b['decode']:.2f}" if b["decode"] else "")
    return table


# -- plots ----------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise SelfextError("{plot} needs matplotlib: pip install 'selfext[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_passkey(results: Sequence[TrialResult], path: str | Path, title: str = "") -> Path:
    """A heatmap per mode (x: length, y: depth, colour: accuracy), like the paper's passkey figure."""
    plt = _pyplot()
    modes = list(dict.fromkeys(r.mode for r in results))
    lengths = sorted({r.length for r in results})
    depths = sorted({r.depth for r in results})
    acc = {(a["mode"], a["length"], a["depth"]): a["accuracy"] for a in accuracy(results)}
    panel = max(1.7, 0.8 * len(lengths))
    fig, axes = plt.subplots(1, len(modes), figsize=(1.5 + panel * len(modes), 1.6 + 0.35 * len(depths)),
                             squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        grid = [[acc.get((mode, n, d), float("nan")) for n in lengths] for d in depths]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d * 100:g}%" for d in depths])
        ax.set_title(mode, fontsize=10)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if grid[i][j] == grid[i][j]:  # not NaN
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("key depth")
    fig.supxlabel("prompt length (tokens)", fontsize=10, y=-0.06)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title, y=1.06)
    return _save(fig, plt, path)


def plot_ppl(results: Sequence[PplResult], path: str | Path, n_ctx_train: int, title: str = "") -> Path:
    """Perplexity against context length, one line per mode, the trained context marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r.mode for r in results):
        rs = sorted((r for r in results if r.mode == mode), key=lambda r: r.length)
        ax.plot([r.length for r in rs], [r.ppl for r in rs], marker="o", label=mode)
    ax.axvline(n_ctx_train, color="grey", linestyle="--", linewidth=1, label="trained context")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    lengths = sorted({r.length for r in results} | {n_ctx_train})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_k(n) for n in lengths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity of the final window")
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, plt, path)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return p
