"""Real model: SmolLM2-135M-Instruct (Q4_1, trained to 8K) finds a pass key far past its trained context
with Self-Extend, and does not without it. Minutes per prompt on 2 CPU cores, so these are marked slow:
`pytest -m slow tests/model` (SELFEXT_TEST_NGL=99 offloads to a GPU build; SELFEXT_TEST_MODEL names another
copy of the model file).

The haystack is llama.cpp's examples/passkey text; keys are 5 random digits at 10 %, 50 % and 90 % depth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def passkey(length: str, *args: str) -> dict:
    ngl = os.environ.get("SELFEXT_TEST_NGL", "0")
    model = [os.environ["SELFEXT_TEST_MODEL"]] if "SELFEXT_TEST_MODEL" in os.environ else []  # default: SmolLM2
    script = Path(sys.executable).with_name("selfext")  # the installed command, not a source checkout's package
    cmd = [str(script), "eval", "passkey", *model, "--lengths", length,
           "--depths", "10,50,90", "--trials", "1", "--seed", "1", "-ngl", ngl, "--json", "-q", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def answered(doc: dict, mode: str) -> list[bool]:
    return [r["correct"] for r in doc["results"] if r["mode"] == mode]


def test_16k_every_key_with_self_extend_and_none_without() -> None:
    doc = passkey("16k", "--modes", "vanilla,selfext", "--ga-n", "8", "--ga-w", "2048")
    assert answered(doc, "selfext") == [True, True, True]
    assert answered(doc, "vanilla") == [False, False, False]


def test_32k_with_self_extend_finds_the_keys_at_half_and_nine_tenths_depth() -> None:
    # measured on the CUDA build (docs/RESULTS.md): 50 % and 90 % found in every trial; the key at 10 % depth
    # (about 29K tokens back) is missed with these settings, as by the position-rewriting baseline
    doc = passkey("32k", "--modes", "selfext", "--ga-n", "8", "--ga-w", "2048")
    assert answered(doc, "selfext")[1:] == [True, True]
