"""Parsing of the evaluation commands' list options: lengths ("4k,8k"), depths ("10,50,90")."""

from __future__ import annotations

import re

from ..errors import ParameterError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_size(text: str) -> int:
    """"4k" -> 4096, "1.5K" -> 1536, "2000" -> 2000, "1m" -> 1048576 (token counts; k = 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise ParameterError(f"not a token count: {text!r} (use e.g. 4096 or 4k)")
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_sizes(text: str, *, allow_zero: bool = False) -> list[int]:
    """A comma-separated list of token counts, in the given order, duplicates dropped."""
    sizes = list(dict.fromkeys(parse_size(t) for t in text.split(",") if t.strip()))
    if not sizes:
        raise ParameterError(f"no token counts in {text!r}")
    bad = [n for n in sizes if n < 0 or (n == 0 and not allow_zero)]
    if bad:
        raise ParameterError(f"token counts must be {'>= 0' if allow_zero else '> 0'}, got {bad[0]}")
    return sizes


def parse_depths(text: str) -> list[float]:
    """"10,50,90" (percent) -> [0.1, 0.5, 0.9]."""
    try:
        depths = list(dict.fromkeys(float(t) / 100 for t in text.split(",") if t.strip()))
    except ValueError:
        raise ParameterError(f"depths are percentages like 10,50,90, got {text!r}") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ParameterError(f"depths are percentages between 0 and 100, got {text!r}")
    return depths
