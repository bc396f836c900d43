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
