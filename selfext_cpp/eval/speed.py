"""Prefill and decode speed at a cache depth, Self-Extend against vanilla, flash attention off and on.

Like llama-bench's ``pp512 @ d4096`` / ``tg32 @ d4096``: the cache is first filled with ``depth`` tokens
(not timed), then we time one prefill of ``n_prompt`` tokens after them and ``n_gen`` single-token decodes
after that. Each repeat removes the timed tokens and times them again; the cache fill is shared by the modes
(Self-Extend is switched on the live context, which keeps the cache valid). Reported: medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine import SelfExtend, check_keys, enable_self_extend, plan, self_extend_keys
from ..errors import ParameterError
from .modes import Contexts, Setting
from .runner import Runner
from .texts import filler_units

SPEED_MODES = ("vanilla", "selfext")


@dataclass
class SpeedConfig:
    depths: Sequence[int] = (0, 4096, 16384)
    n_prompt: int = 512
    n_gen: int = 32
    repeats: int = 3
    flash_attn: Sequence[bool] = (False, True)
    ga: SelfExtend | None = None  # None: see speed_self_extend()
    n_batch: int = 512
    ga_keys: str = "auto"  # the form of the fused op's grouped keys asked for (engine.set_self_extend_keys)
    llama_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"depths": list(self.depths), "n_prompt": self.n_prompt, "n_gen": self.n_gen,
                "repeats": self.repeats, "flash_attn": list(self.flash_attn), "n_batch": self.n_batch,
                "ga_n": self.ga.ga_n if self.ga else None, "ga_w": self.ga.ga_w if self.ga else None,
                "ga_keys": self.ga_keys}


@dataclass
class SpeedResult:
    depth: int
    flash_attn: bool
    mode: str
    ga_n: int
    ga_w: int
    prefill_tps: float  # median tokens/s of the n_prompt prefill
    decode_tps: float  # median tokens/s of the n_gen single-token decodes
    prefill_runs: list[float]
    decode_runs: list[float]
    ga_keys: str | None = None  # the form the fused op kept in this run (None: no fused op)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def speed_self_extend(n_ctx_train: int, n_needed: int, ga: SelfExtend | None) -> SelfExtend:
    """The given G/W; else the automatic choice for the deepest run; else (it fits) the choice for
    2 × n_ctx_train, so that the grouped branch has work to do."""
    if ga is not None:
        return plan(n_ctx_train, ga_n=ga.ga_n, ga_w=ga.ga_w)
    chosen = plan(n_ctx_train, n_needed, auto=True)
    return chosen if chosen.enabled else plan(n_ctx_train, 2 * n_ctx_train, auto=True)


def ratios(results: Sequence[SpeedResult]) -> list[dict[str, Any]]:
    """selfext / vanilla, per (depth, flash_attn), for prefill and decode."""
    by = {(r.depth, r.flash_attn, r.mode): r for r in results}
    out = []
    for (depth, fa, mode), r in by.items():
        v = by.get((depth, fa, "vanilla"))
        if mode == "selfext" and v is not None:
            out.append({"depth": depth, "flash_attn": fa,
                        "prefill": round(r.prefill_tps / v.prefill_tps, 3) if v.prefill_tps else None,
                        "decode": round(r.decode_tps / v.decode_tps, 3) if v.decode_tps else None})
    return out


def best_ratios(results: Sequence[SpeedResult]) -> list[dict[str, Any]]:
    """Per depth, the faster Self-Extend setting over the faster vanilla one (flash attention off or on, each
    chosen separately for prefill and decode): what a user who picks the best setting of each gets."""
    out = []
    for depth in dict.fromkeys(r.depth for r in results):
        at = [r for r in results if r.depth == depth]
        row: dict[str, Any] = {"depth": depth}
        for key, attr in (("prefill", "prefill_tps"), ("decode", "decode_tps")):
            s = max((getattr(r, attr) for r in at if r.mode == "selfext"), default=0.0)
            v = max((getattr(r, attr) for r in at if r.mode == "vanilla"), default=0.0)
            row[key] = round(s / v, 3) if s and v else None
        out.append(row)
    return out


class SpeedRun:
    def __init__(self, model_path: str | Path, config: SpeedConfig) -> None:
        if config.n_prompt < 1 or config.n_gen < 1 or config.repeats < 1 or not config.depths:
            raise ParameterError("need {n_prompt}, {n_gen} and {repeats} >= 1 and at least one depth")
        check_keys(config.ga_keys)
        self.model_path = model_path
        self.config = config
        self.n_ctx = max(config.depths) + config.n_prompt + config.n_gen + 8
        self._contexts: Contexts | None = None
        with Contexts(model_path, n_ctx=64, n_batch=64, keep=1, **config.llama_kwargs) as probe:
            self.n_ctx_train = probe.n_ctx_train
            llm = probe.llm()
            filler = " ".join(filler_units("repeat"))
            unit = llm.tokenize((" " + filler).encode(), add_bos=False)
        self.ga = speed_self_extend(self.n_ctx_train, self.n_ctx, config.ga)
        self.filler = (unit * (self.n_ctx // len(unit) + 1))[: self.n_ctx]
        n_modes = len(SPEED_MODES)
        self.total_tokens = sum(
            d + n_modes * config.repeats * (config.n_prompt + config.n_gen) for d in config.depths
        ) * len(config.flash_attn)

    def _time(self, runner: Runner, depth: int) -> tuple[float, float]:
        c = self.config
        runner.seq_rm(depth, -1)
        toks = self.filler[depth:depth + c.n_prompt]
        t0 = time.perf_counter()
        for i in range(0, len(toks), runner.n_batch):
            part = toks[i:i + runner.n_batch]
            runner.decode(part, list(range(depth + i, depth + i + len(part))))
        t1 = time.perf_counter()
        pos = depth + c.n_prompt
        for j in range(c.n_gen):
            runner.decode([self.filler[(pos + j) % len(self.filler)]], [pos + j])
        t2 = time.perf_counter()
        return c.n_prompt / (t1 - t0), c.n_gen / (t2 - t1)

    def run(self, on_tokens: Callable[[int], None] | None = None,
            on_start: Callable[[str, int, bool], None] | None = None) -> Iterator[SpeedResult]:
        c = self.config
        tick = on_tokens or (lambda n: None)
        for fa in c.flash_attn:
            self._contexts = Contexts(self.model_path, n_ctx=self.n_ctx, n_batch=c.n_batch, keep=1,
                                      flash_attn=fa, ga_keys=c.ga_keys, **c.llama_kwargs)
            try:
                llm = self._contexts.llm()
                runner = self._contexts.sequence(Setting("vanilla")).runner
                for depth in c.depths:
                    if on_start is not None:
                        on_start("fill", depth, fa)
                    runner.clear()
                    enable_self_extend(llm, 1, 0)
                    for i in range(0, depth, runner.n_batch):  # fill the cache, untimed
                        part = self.filler[i:min(depth, i + runner.n_batch)]
                        runner.decode(part, list(range(i, i + len(part))))
                        tick(len(part))
                    for mode in SPEED_MODES:
                        if on_start is not None:
                            on_start(mode, depth, fa)
                        ga = self.ga if mode == "selfext" else SelfExtend(1, 0)
                        enable_self_extend(llm, ga.ga_n, ga.ga_w, warn_slow=False)
                        keys = self_extend_keys(llm)
                        runs = []
                        for _ in range(c.repeats):
                            runs.append(self._time(runner, depth))
                            tick(c.n_prompt + c.n_gen)
                        pp, tg = [r[0] for r in runs], [r[1] for r in runs]
                        yield SpeedResult(depth, fa, mode, ga.ga_n, ga.ga_w, round(statistics.median(pp), 2),
                                          round(statistics.median(tg), 2), [round(x, 2) for x in pp],
                                          [round(x, 2) for x in tg], keys)
            finally:
                self._contexts.close()
                self._contexts = None

    def close(self) -> None:
        if self._contexts is not None:
            self._contexts.close()

