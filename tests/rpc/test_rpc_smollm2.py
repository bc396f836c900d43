"""Real model over RPC: SmolLM2-135M-Instruct (trained to 8K) reads a 9,672-token pass-key document with its
layers on a `selfext rpc-server` and answers with the local run's greedy tokens, on the fused and the generic
path. Minutes on 2 CPU cores: `pytest -m slow tests/rpc`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from live_server import SELFEXT
from rpcutil import RpcServer, selfext_env

pytestmark = pytest.mark.slow

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "examples" / "passkey-10k.txt"


def answer(*args: str) -> dict:
    cmd = [*SELFEXT, "run", "-f", str(DOCUMENT), "--auto", "--no-chat", "-n", "8", "--temp", "0", "-t", "2",
           "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=selfext_env(), timeout=1800)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("fa", ["-fa", "-no-fa"], ids=["fused", "generic"])
def test_smollm2_over_rpc_gives_the_local_answer_past_its_trained_window(rpc_server: RpcServer, fa: str) -> None:
    local = answer(fa)
    remote = answer(fa, "--rpc", rpc_server.endpoint, "-ngl", "99")
    assert local["prompt_tokens"] > local["n_ctx_train"] and local["self_extend"]
    assert (remote["text"], remote["generated_tokens"]) == (local["text"], local["generated_tokens"])
    assert "48213" in local["text"]  # the pass key, as the README shows
