"""The benchmarks that run our library end to end, on a tiny model: they must not break unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tinymodel import make_tiny_gguf

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_decode_depth_times_every_form_from_one_saved_cache(tmp_path: Path) -> None:
    model = make_tiny_gguf(tmp_path / "llama-gqa.gguf", arch="llama", n_head_kv=2)
    got = subprocess.run([sys.executable, str(BENCH / "decode_depth.py"), str(model.path), "--tokens", "300",
                          "--ga-n", "4", "--ga-w", "16", "--forms", "steps,table,cache", "--rounds", "1",
                          "--n-gen", "3", "-t", "2", "--json"], capture_output=True, text=True, check=False,
                         timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    rows = json.loads(got.stdout)["results"]
    assert list(rows) == ["vanilla", "steps", "table", "cache"]
    assert all(r["median"] > 0 and len(r["decode_tps"]) == 1 for r in rows.values())


def test_op_speed_times_every_form_of_the_grouped_keys_against_vanilla() -> None:
    got = subprocess.run([sys.executable, str(BENCH / "op_speed.py"), "--cpu", "-t", "2", "--shape", "64:4:2",
                          "--n-q", "1", "--n-q", "70", "--depth", "600", "--form", "steps,table,cache",
                          "--repeats", "1"], capture_output=True, text=True, check=False, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    rows = [line.split() for line in got.stdout.splitlines()[1:]]
    assert [(r[0], r[4]) for r in rows] == [(f, n_q) for n_q in ("1", "70") for f in ("steps", "table", "cache")]
    assert all(float(r[-1]) > 0 for r in rows)  # the ratio of two measured times
