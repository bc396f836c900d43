"""`selfext serve --parallel N`: llama.cpp's own server, built from our tree, with Self-Extend on every slot.

The tiny model (random weights, trained on 64 tokens, G=4 W=16: capacity 208) makes "past the trained context"
cheap; its text is gibberish, so what is specified is the shape of the answers, the limits, and that a request
gets the same tokens whether it is served alone or next to others (greedy). Skipped when this install has no
llama-server (it is built only with -DSELFEXT_SERVER=ON; see the README, Server).
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from live_server import CAPACITY, GA_N, GA_W, N_CTX_TRAIN, LiveServer, StartServer, words

from selfext_cpp import llama_server

pytestmark = pytest.mark.skipif(llama_server.binary() is None,
                                reason="llama-server not built (CMAKE_ARGS=-DSELFEXT_SERVER=ON)")

PARALLEL = 4
ARGS = ["--parallel", str(PARALLEL), "--ga-n", str(GA_N), "--ga-w", str(GA_W), "-t", "2"]
PROMPTS = [words(150, start=100 * i) for i in range(PARALLEL)]  # 151 tokens each: past 64, within 208


@pytest.fixture(scope="module")
def par(start_server: StartServer) -> LiveServer:
    return start_server(*ARGS)


def complete(server: LiveServer, prompt: str, max_tokens: int = 12, cache: bool = True) -> openai.types.Completion:
    return server.client().completions.create(model="tiny.gguf", prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, extra_body={"cache_prompt": cache})


def test_ready_line_names_the_engine_the_slots_and_the_setting(par: LiveServer) -> None:
    assert f"with llama-server, {PARALLEL} slots (Self-Extend --ga-n {GA_N} --ga-w {GA_W}; {CAPACITY} tokens " \
           f"per request, trained on {N_CTX_TRAIN})" in par.log()


def test_every_slot_reaches_what_self_extend_reaches(par: LiveServer) -> None:
    status, props = par.json("GET", "/props")

    assert status == 200
    assert props["total_slots"] == PARALLEL
    assert props["default_generation_settings"]["n_ctx"] == CAPACITY  # upstream caps slots at n_ctx_train (64)


def test_concurrent_requests_past_the_trained_context_equal_each_served_alone(par: LiveServer) -> None:
    alone = [complete(par, p, cache=False) for p in PROMPTS]
    with ThreadPoolExecutor(PARALLEL) as pool:  # every prompt read afresh, next to the others
        together = list(pool.map(lambda p: complete(par, p, cache=False), PROMPTS))

    for a, t in zip(alone, together):
        assert a.usage.prompt_tokens == 151 > N_CTX_TRAIN
        assert t.usage.completion_tokens == 12
        assert t.choices[0].text == a.choices[0].text
    assert len({a.choices[0].text for a in alone}) == PARALLEL  # four different answers, not one slot's four times


def test_requests_run_in_parallel_slots(par: LiveServer) -> None:
    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(lambda p: complete(par, p, 4), PROMPTS))

    _, slots = par.json("GET", "/slots")
    assert len(slots) == PARALLEL
    assert all(s["n_ctx"] == CAPACITY for s in slots)


def test_a_prompt_beyond_the_reach_is_a_400_naming_the_limit(par: LiveServer) -> None:
    status, body = par.json("POST", "/v1/completions", {"prompt": words(240), "max_tokens": 4})

    assert status == 400
    assert body["error"]["type"] == "exceed_context_size_error"
    assert f"({CAPACITY} tokens)" in body["error"]["message"]
    assert complete(par, PROMPTS[0], 2).usage.completion_tokens == 2  # and it carries on


def test_malformed_json_is_a_400(par: LiveServer) -> None:
    status, _, body = par.http("POST", "/v1/completions", raw=b'{"prompt": "w1", "max_tokens": ')

    assert status == 400
    assert "error" in json.loads(body)


def test_a_client_that_disconnects_mid_stream_leaves_the_server_serving(par: LiveServer) -> None:
    host, port = par.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 150, "temperature": 0, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while got.count(b"data: ") < 2:  # the first tokens are streaming
            got += sock.recv(4096)
    # the client is gone; the slot notices at its next token and frees itself

    assert complete(par, PROMPTS[2], 3).usage.completion_tokens == 3
    assert par.http("GET", "/health")[0] == 200


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _llama_server_pid(server: LiveServer) -> int:
    # `selfext serve` runs llama-server as its child
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    assert len(children) == 1
    return int(children[0])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process's memory from /proc")
def test_a_hundred_requests_in_a_row_keep_memory_flat(par: LiveServer) -> None:
    pid = _llama_server_pid(par)
    for i in range(10):  # warm: every slot used, buffers at their working size
        complete(par, words(120, start=i), 4)
    before = _rss_kib(pid)
    for i in range(100):
        complete(par, words(120, start=i + 10), 4)
    after = _rss_kib(pid)

    assert after - before < 8 * 1024, f"RSS grew from {before} to {after} KiB over 100 requests"


def test_without_self_extend_a_slot_holds_the_trained_context(start_server: StartServer) -> None:
    server = start_server("--parallel", "2", "-t", "2")

    status, props = server.json("GET", "/props")
    assert status == 200 and props["default_generation_settings"]["n_ctx"] == N_CTX_TRAIN
    assert "Self-Extend off; 64 tokens per request" in server.log()


def test_a_window_past_the_trained_context_is_refused_before_starting(start_server: StartServer) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)exited with 2:.*--ga-w 64 must be smaller than the model's trained"):
        start_server("--parallel", "2", "--ga-n", "4", "--ga-w", "64")


@pytest.mark.parametrize("keys", ["cache", "table"])
def test_ga_keys_reaches_every_context_of_llama_server(start_server: StartServer, keys: str) -> None:
    server = start_server("--parallel", "2", "--ga-n", str(GA_N), "--ga-w", str(GA_W), "--ga-keys", keys, "-t", "2",
                          "--verbose")

    assert complete(server, PROMPTS[0], 4).usage.prompt_tokens == 151
    assert f"G = {GA_N}, W = {GA_W}, fused flash attention (keys: {keys})" in server.log()


def test_ctx_size_is_per_slot(start_server: StartServer) -> None:
    server = start_server("--parallel", "2", "--ga-n", str(GA_N), "--ga-w", str(GA_W), "-c", "160", "-t", "2")

    _, props = server.json("GET", "/props")
    assert props["default_generation_settings"]["n_ctx"] == 160
    assert "2 slots (Self-Extend --ga-n 4 --ga-w 16; 160 tokens per request" in server.log()
    assert complete(server, words(140), 4).usage.prompt_tokens == 141
    status, body = server.json("POST", "/v1/completions", {"prompt": words(170), "max_tokens": 4})
    assert status == 400 and "(160 tokens)" in body["error"]["message"]


def test_stop_ends_llama_server_too(start_server: StartServer) -> None:
    server = start_server("--parallel", "1", "-t", "2")
    child = _llama_server_pid(server)

    server.stop()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()



def test_self_extend_is_set_again_when_the_server_wakes_from_sleep(tiny_model: Path) -> None:
    cfg = llama_server.config(tiny_model, parallel=2, ga_n=GA_N, ga_w=GA_W, threads=2,
                              extra=("--sleep-idle-seconds", "1"))
    with llama_server.start(cfg, port=0, timeout=60) as srv:
        server = LiveServer(srv.proc, srv.url, Path("/dev/null"), Path("/dev/null"))
        before = complete(server, PROMPTS[0], cache=False).choices[0].text
        deadline = time.monotonic() + 30
        while not any("entering sleeping state" in line for line in srv.tail) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("entering sleeping state" in line for line in srv.tail)
        after = complete(server, PROMPTS[0], cache=False).choices[0].text  # wakes it: a new context

        assert after == before
        assert sum("Self-Extend on the target context" in line for line in srv.tail) >= 2
