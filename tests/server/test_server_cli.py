"""`selfext serve` on the command line: startup errors as one line and an exit code, --auto-max-ctx, Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import SELFEXT, LiveServer, start, words
from tinymodel import make_tiny_gguf


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SELFEXT, "serve", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--ga-n", "4", "--ga-w", "64"], 2,
     "--ga-w 64 must be smaller than the model's trained context (64); try --ga-w 16"),
    (["--ga-n", "4", "--ga-w", "16", "-c", "300"], 1,
     "300 tokens exceed the capacity 208 of --ga-n 4 --ga-w 16 on a 64-token model; try --ga-n 8 --ga-w 16"),
    (["--ga-n", "4", "--auto-max-ctx", "300"], 2,
     "--auto-max-ctx chooses G and W itself: give either --auto-max-ctx or --ga-n/--ga-w, not both"),
    (["-c", "100", "--auto-max-ctx", "300"], 2,
     "give either -c or --auto-max-ctx, not both (--auto-max-ctx 300 serves a 300-token context)"),
    (["--ga-n", "4", "--ga-keys", "rows"], 2, "--ga-keys is one of auto, steps, table, cache, not 'rows'"),
    (["--ga-n", "4", "--ga-keys", "rows", "--parallel", "2"], 2,
     "--ga-keys is one of auto, steps, table, cache, not 'rows'"),
], ids=["window-too-wide", "context-beyond-capacity", "ga-n-and-auto", "c-and-auto", "ga-keys",
        "ga-keys-parallel"])  # fmt: skip
def test_bad_settings_fail_in_one_line_before_loading(tiny_model: Path, args: list[str], code: int,
                                                      message: str) -> None:
    got = serve(str(tiny_model), *args)

    assert (got.returncode, got.stderr, got.stdout) == (code, f"selfext: error: {message}\n", "")


@pytest.mark.parametrize("parallel", [[], ["--parallel", "2"]], ids=["one-request", "parallel"])
def test_a_context_larger_than_the_machine_fails_in_one_line(tiny_model: Path, parallel: list[str]) -> None:
    from selfext_cpp import llama_server

    if parallel and llama_server.binary() is None:
        pytest.skip("this install has no llama-server")
    got = serve(str(tiny_model), "--ga-n", "100000000", "--ga-w", "16", "-c", "2000000000", *parallel)

    what = "2 slots of 2000000000 tokens need" if parallel else "a context of 2000000000 tokens needs"
    assert got.returncode == 2 and got.stdout == ""
    assert re.fullmatch(f"selfext: error: {what} about [\\d.]+ GiB for the KV cache, more than this machine's "
                        f"[\\d.]+ GiB of memory: lower -c\n", got.stderr), got.stderr


def test_missing_model_file_fails_in_one_line(tmp_path: Path) -> None:
    got = serve(str(tmp_path / "nope.gguf"))

    assert (got.returncode, got.stderr) == (1, f"selfext: error: model file not found: {tmp_path / 'nope.gguf'}\n")


def test_busy_port_fails_in_one_line(tiny_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        got = serve(str(tiny_model), "--port", str(port))

    assert (got.returncode, got.stderr) == (
        1, f"selfext: error: cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port\n")


def test_help_ends_with_an_example() -> None:
    got = subprocess.run([*SELFEXT, "serve", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})

    assert got.returncode == 0
    assert got.stdout.endswith("\n\n  Example:\n    selfext serve model.gguf --auto-max-ctx 16384 --port 8080\n")


@pytest.fixture(scope="module")
def auto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """--auto-max-ctx 600 on a model trained on 256 tokens (choose() needs W <= L/2 with W >= 64)."""
    model = tmp_path_factory.mktemp("model") / "tiny256.gguf"
    make_tiny_gguf(model, n_ctx_train=256, vocab_size=1024)
    server = start(model, "--auto-max-ctx", "600", "-t", "2", log_dir=tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


def test_auto_max_ctx_serves_that_many_tokens_with_g_and_w_from_choose(auto_server: LiveServer) -> None:
    from selfext_cpp import choose

    params = choose(256, 600)
    assert params is not None

    status, health = auto_server.json("GET", "/health")

    assert (status, health["n_ctx"], health["self_extend"]) == (200, 600, {
        "ga_n": params.ga_n, "ga_w": params.ga_w, "ga_keys": "steps", "capacity": params.capacity(256)})
    assert (f"selfext: serving tiny256.gguf at {auto_server.url}/v1 (Self-Extend --ga-n {params.ga_n} "
            f"--ga-w {params.ga_w}; 600 tokens per request, trained on 256)\n") in auto_server.log()


def test_prompt_beyond_the_served_context_names_the_reach_left_unused(auto_server: LiveServer) -> None:
    status, got = auto_server.json("POST", "/v1/completions", {"prompt": words(700), "max_tokens": 4})

    assert status == 400
    assert got["error"]["message"].startswith(
        "This model's maximum context length is 600 tokens, prompt and completion together; however your prompt "
        "came to 701 tokens. The server was started for 600 (-c or --auto-max-ctx); Self-Extend (--ga-n ")


def test_ctrl_c_stops_the_server_with_130(auto_server: LiveServer) -> None:
    auto_server.proc.send_signal(signal.SIGINT)

    assert auto_server.proc.wait(15) == 130
    assert auto_server.log().endswith("selfext: interrupted\n")


def test_parallel_without_llama_server_says_how_to_build_it(tiny_model: Path, tmp_path: Path) -> None:
    env = dict(os.environ, SELFEXT_LLAMA_SERVER=str(tmp_path / "absent"))  # as in an install without it
    out = subprocess.run([*SELFEXT, "serve", str(tiny_model), "--parallel", "2"], capture_output=True, text=True,
                         timeout=60, env=env)

    assert out.returncode == 1
    assert out.stderr.startswith("selfext: error: --parallel needs llama-server, which this install lacks; "
                                 "build it: CMAKE_ARGS=\"-DSELFEXT_SERVER=ON")
