"""`selfext run --rpc`: layers on a `selfext rpc-server` (a second process on 127.0.0.1) give the local tokens,
and every fault ends as one line and exit 1, bounded in time."""

from __future__ import annotations

import gc
import json
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from live_server import SELFEXT
from rpcutil import OUR_PROTOCOL, CutProxy, FakeServer, RpcServer, _recv_exact, free_port, selfext_env

DOC = " ".join(["hello world the"] * 150)  # 451 tokens with BOS: past the tiny model's trained 256
SELF_EXTEND = ["--ga-n", "4", "--ga-w", "64", "--temp", "0", "-t", "2", "--no-chat"]
RUN_TIMEOUT = 120  # seconds; a run takes ~2 s, but the machine is shared


def run(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SELFEXT, "run", *map(str, args)], capture_output=True, text=True,
                          env=env or selfext_env(), timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("fa", ["-fa", "-no-fa"], ids=["fused", "generic"])
def test_layers_on_an_rpc_server_give_the_local_greedy_tokens_past_the_trained_window(
        tiny_model: Path, rpc_server: RpcServer, fa: str) -> None:
    from typer.testing import CliRunner

    from selfext_cpp.cli.app import app

    args = ["run", str(tiny_model), "-p", DOC, "-n", "24", *SELF_EXTEND, fa, "--json"]
    local = CliRunner().invoke(app, args)
    remote = CliRunner().invoke(app, [*args, "--rpc", rpc_server.endpoint, "-ngl", "99", "-v"])
    gc.collect()  # the run's Llama, and with it the connection: the server serves one client at a time
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    assert _tokens(remote.stdout) == _tokens(local.stdout)
    assert f"RPC0[{rpc_server.endpoint}] model buffer size" in remote.stderr  # the layers went there
    # the fused op runs on the server when it says it can (RPC_CMD_SUPPORTS_OP); without -fa the generic path
    assert ("--ga-w 64 (fused, --ga-keys steps)" in remote.stderr) == (fa == "-fa")  # RPC: auto takes steps


def _tokens(stdout: str) -> tuple[str, int, int]:
    d = json.loads(stdout)
    return d["text"], d["prompt_tokens"], d["generated_tokens"]


def test_an_unreachable_server_is_one_line_and_exit_1(tiny_model: Path) -> None:
    port = free_port()  # nothing listens there
    line = error_line(run(tiny_model, "-p", "hi", "-n", "2", "--rpc", f"127.0.0.1:{port}", "-ngl", "99"))
    assert line == f"selfext: error: cannot reach RPC server 127.0.0.1:{port} (Connection refused)"


def test_a_server_of_another_protocol_is_refused_at_the_hello(tiny_model: Path) -> None:
    fake = FakeServer((7, 0, 0))  # upstream llama.cpp's rpc-server of the pinned version
    try:
        line = error_line(run(tiny_model, "-p", "hi", "-n", "2", "--rpc", fake.endpoint, "-ngl", "99"))
    finally:
        fake.close()
    assert line == (f"selfext: error: RPC server {fake.endpoint} speaks RPC protocol 7.0.0, this client 110.0.0 "
                    "(llama.cpp's with selfext's ops): run the rpc-server of the same selfext version there")


def test_a_server_that_never_answers_the_hello_times_out(tiny_model: Path) -> None:
    fake = FakeServer(None)  # accepts, then says nothing (as a server busy with another client)
    t0 = time.monotonic()
    try:
        line = error_line(run(tiny_model, "-p", "hi", "-n", "2", "--rpc", fake.endpoint, "-ngl", "99",
                              env=selfext_env(SELFEXT_RPC_CONNECT_TIMEOUT="1")))
    finally:
        fake.close()
    assert line.startswith(f"selfext: error: RPC server {fake.endpoint} did not answer the hello within 1 s")
    assert time.monotonic() - t0 < RUN_TIMEOUT / 2


@pytest.mark.parametrize("cut_after", [1, 4], ids=["mid-prefill", "mid-decode"])
def test_a_server_lost_mid_run_is_one_line_and_exit_1_and_the_server_serves_the_next_client(
        tiny_model: Path, rpc_server: RpcServer, cut_after: int) -> None:
    # the proxy ends the connection right after the client's n-th graph: the prompt is 1 graph, each token 1
    proxy = CutProxy(rpc_server.port, cut_after=cut_after)
    try:
        result = run(tiny_model, "-p", DOC, "-n", "24", *SELF_EXTEND, "--rpc", proxy.endpoint, "-ngl", "99")
    finally:
        proxy.close()
    assert proxy.graphs == cut_after
    assert error_line(result) == (f"selfext: error: lost the connection to RPC server {proxy.endpoint} (it "
                                  "stopped, or the network failed)")
    again = run(tiny_model, "-p", "hi", "-n", "2", *SELF_EXTEND, "--rpc", rpc_server.endpoint, "-ngl", "99")
    assert again.returncode == 0, again.stderr


def test_our_server_answers_the_hello_with_its_own_protocol_so_other_clients_refuse_it(
        rpc_server: RpcServer) -> None:
    # an upstream client compares the major version (7) and stops at the hello; the server serves on
    with socket.create_connection(("127.0.0.1", rpc_server.port), timeout=10) as s:
        s.sendall(bytes([14]) + struct.pack("<Q", 24) + bytes(24))  # RPC_CMD_HELLO, 24 bytes of capabilities
        size = struct.unpack("<Q", _recv_exact(s, 8) or bytes(8))[0]
        answer = _recv_exact(s, size) or b""
    assert tuple(answer[:3]) == OUR_PROTOCOL
    assert rpc_server.proc.poll() is None
