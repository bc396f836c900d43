"""`load(..., rpc=[...])`, `selfext serve --rpc` and `selfext rpc-server`: errors are SelfextErrors, a server
answers 5xx and stays up, the rpc-server command runs the program built with selfext."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from live_server import start
from rpcutil import (
    RPC_CMD_SET_TENSOR,
    RPC_CMD_SET_TENSOR_HASH,
    CutProxy,
    RpcServer,
    free_port,
    start_rpc_server,
)

DOC = " ".join(["hello world the"] * 150)  # past the tiny model's trained 256 tokens


def test_endpoints_are_host_port_pairs() -> None:
    from selfext_cpp.errors import ParameterError
    from selfext_cpp.rpc import parse_endpoints

    assert parse_endpoints("10.0.0.2:50052, gpu-box:50053") == ["10.0.0.2:50052", "gpu-box:50053"]
    assert parse_endpoints(["[::1]:1"]) == ["[::1]:1"]
    for bad in ["", "10.0.0.2", "10.0.0.2:0", "host:70000", "a:1,a:1"]:
        with pytest.raises(ParameterError):
            parse_endpoints(bad)


@pytest.mark.parametrize("n_gpu_layers", [1, 99], ids=["one-layer-remote", "all-remote"])
@pytest.mark.parametrize(("flash_attn", "keys"), [(True, "steps"), (True, "table"), (True, "cache"), (False, "auto")],
                         ids=["fused-steps", "fused-table", "fused-cache", "generic"])
def test_logits_over_rpc_are_the_local_logits_past_the_trained_window(
        tiny_model: Path, rpc_server: RpcServer, flash_attn: bool, keys: str, n_gpu_layers: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The server runs the same CPU kernels with the same thread count on the same inputs: bit for bit equal
    # in practice; 1e-6 allows for a different summation order, far below a change of greedy token. Both
    # contexts get the same form of the grouped keys (the forms round the grouped keys differently).
    import numpy as np

    from selfext_cpp import load, self_extend_fused

    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", keys)
    kw: dict[str, Any] = dict(ga_n=4, ga_w=64, n_ctx=512, n_threads=2, n_threads_batch=2, flash_attn=flash_attn)
    local = load(tiny_model, **kw)
    remote = load(tiny_model, n_gpu_layers=n_gpu_layers, rpc=[rpc_server.endpoint], **kw)
    try:
        assert self_extend_fused(remote) == self_extend_fused(local) == flash_attn
        tokens = local.tokenize(DOC.encode())  # 451 tokens: past the trained 256
        for _ in range(8):  # the prompt, then greedy tokens one by one
            for llm in (local, remote):
                llm.eval(tokens)
            a, b = (last_logits(llm) for llm in (local, remote))
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
            tokens = [int(np.argmax(a))]
    finally:
        local.close()
        remote.close()


def test_layers_on_an_rpc_device_keep_nothing_per_cell_by_default(
        tiny_model: Path, rpc_server: RpcServer, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # K outside host memory, on a device that the server's CPU backend runs: the server answers that it has the op's
    # steps form, so auto keeps neither a second K cache nor a table per cell there
    from selfext_cpp import load, self_extend_fused

    monkeypatch.delenv("LLAMA_SELF_EXTEND_KEYS", raising=False)
    remote = load(tiny_model, ga_n=4, ga_w=64, n_ctx=512, n_threads=2, n_gpu_layers=99, rpc=[rpc_server.endpoint],
                  flash_attn=True, verbose=True)
    try:
        assert self_extend_fused(remote)
    finally:
        remote.close()
    log = capfd.readouterr().err
    assert "se_kcache_alloc: grouped-key rotations (steps, kernels rotate K): 0.01 MiB" in log  # the table of steps
    assert "se_kcache_alloc: grouped keys:" not in log


@pytest.mark.parametrize("keys", ["steps", "table", "cache"])
def test_a_decode_step_over_rpc_uploads_the_self_extend_inputs_as_one_tensor(
        tiny_model: Path, rpc_server: RpcServer, keys: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every graph input set on the host costs each ubatch one upload to the device that reads it: a round trip over
    # RPC, two synchronizations on a GPU. The fused path's positions, shifts and table rows travel as one, and the op
    # masks by those positions, so llama.cpp's mask is not uploaded: as many uploads as vanilla's.
    from selfext_cpp import load

    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", keys)
    proxy = CutProxy(rpc_server.port)

    def uploads_per_step(ga_n: int) -> int:
        llm = load(tiny_model, ga_n=ga_n, ga_w=64 if ga_n > 1 else 0, n_ctx=512, n_threads=2, n_gpu_layers=99,
                   rpc=[proxy.endpoint], flash_attn=True)
        try:
            tokens = llm.tokenize(DOC.encode())
            llm.eval(tokens)
            llm.eval(tokens[:1])  # the first step builds the single-token graph
            before = proxy.commands.copy()
            llm.eval(tokens[1:2])
            sent = proxy.commands - before
            return sent[RPC_CMD_SET_TENSOR] + sent[RPC_CMD_SET_TENSOR_HASH]
        finally:
            llm.close()

    try:
        vanilla = uploads_per_step(1)
        assert vanilla > 0
        assert uploads_per_step(4) == vanilla
    finally:
        proxy.close()


def last_logits(llm: Any) -> Any:
    import numpy as np
    from llama_cpp import llama_cpp

    n_vocab = llama_cpp.llama_vocab_n_tokens(llm._model.vocab)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()


def test_load_raises_rpc_error_for_an_unreachable_server(tiny_model: Path) -> None:
    from selfext_cpp import RpcError, load

    port = free_port()
    with pytest.raises(RpcError, match=rf"^cannot reach RPC server 127\.0\.0\.1:{port} \(Connection refused\)$"):
        load(tiny_model, n_gpu_layers=99, rpc=[f"127.0.0.1:{port}"])


def test_a_killed_server_makes_every_later_eval_raise_rpc_error(tiny_model: Path, tmp_path: Path) -> None:
    from selfext_cpp import RpcError, load, self_extend_fused

    server = start_rpc_server(tmp_path)
    try:
        llm = load(tiny_model, ga_n=4, ga_w=64, n_ctx=512, n_gpu_layers=99, n_threads=2, rpc=server.endpoint)
        assert self_extend_fused(llm)  # the server said its CPU runs the fused op
        tokens = llm.tokenize(DOC.encode())
        llm.eval(tokens)
        server.kill()
        for _ in range(2):  # the decode in flight, and every later one
            with pytest.raises(RpcError, match=f"lost the connection to RPC server {server.endpoint}"):
                llm.eval(tokens[-1:])
        llm.close()
    finally:
        server.kill()


def test_serve_answers_a_lost_rpc_server_with_a_5xx_json_error_and_stays_up(
        tiny_model: Path, rpc_server: RpcServer, tmp_path: Path) -> None:
    proxy = CutProxy(rpc_server.port)
    srv = start(tiny_model, "--ga-n", "4", "--ga-w", "64", "-t", "2", "--rpc", proxy.endpoint, "-ngl", "99",
                log_dir=tmp_path)
    try:
        request = {"prompt": "hello world", "max_tokens": 4, "temperature": 0}
        assert srv.json("POST", "/v1/completions", request)[0] == 200
        proxy.cut()
        status, body = srv.json("POST", "/v1/completions", {**request, "prompt": "the world"})
        assert 500 <= status < 600
        assert f"lost the connection to RPC server {proxy.endpoint}" in body["error"]["message"]
        assert srv.json("GET", "/health")[0] == 200
        assert srv.proc.poll() is None
    finally:
        srv.stop()
        proxy.close()


def test_rpc_server_runs_the_program_built_with_selfext_and_warns_beyond_loopback(
        cli_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfext_cpp.rpc import server_program

    calls: list[list[str]] = []
    monkeypatch.setattr(os, "dup2", lambda a, b: None)
    monkeypatch.setattr(os, "execv", lambda path, args: calls.append([path, *args]))
    port = free_port()
    result = cli_app("rpc-server", "--host", "0.0.0.0", "--port", str(port), "-t", "3", "--device", "CPU")
    assert result.exit_code == 0, result.output
    program = str(server_program())
    assert calls == [[program, program, "--host", "0.0.0.0", "--port", str(port), "--threads", "3",
                      "--device", "CPU"]]
    assert "no authentication" in result.stderr


def test_rpc_server_on_a_busy_port_is_one_line_and_exit_1(cli_app: Any, rpc_server: RpcServer) -> None:
    result = cli_app("rpc-server", "--port", str(rpc_server.port))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"selfext: error: cannot listen on 127.0.0.1:{rpc_server.port}: ")


@pytest.fixture
def cli_app() -> Any:
    from typer.testing import CliRunner

    from selfext_cpp.cli.app import app

    return lambda *args: CliRunner().invoke(app, list(args))
