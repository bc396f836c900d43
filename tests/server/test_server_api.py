"""`selfext serve` speaks the OpenAI API with Self-Extend on: the openai client and raw HTTP against a live server.

The tiny model has random weights, so its text is gibberish; what is specified is the shape of every answer,
token counts, and equality with the library (and between streaming and not) at temperature 0.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from live_server import (CAPACITY, GA_N, GA_W, N_CTX_TRAIN, SELF_EXTEND_ARGS, LiveServer, StartServer,
                         words)

ATOL = 1e-4  # same process-independent f32 CPU maths as the library (observed: identical); vanilla is ~1e-1 off
LONG = words(150)  # 151 tokens: past the trained 64, within the capacity 208
TOO_LONG = words(240)  # 241 tokens: past the capacity


def test_health_reports_the_self_extend_setting(server: LiveServer) -> None:
    assert server.json("GET", "/health") == (200, {
        "status": "ok", "model": "tiny.gguf", "n_ctx": CAPACITY, "n_ctx_train": N_CTX_TRAIN,
        "self_extend": {"ga_n": GA_N, "ga_w": GA_W, "ga_keys": "steps", "capacity": CAPACITY},
    })  # fmt: skip  (ga_keys: the CPU's own choice)


def test_ga_keys_picks_the_form_of_the_grouped_keys(start_server: StartServer) -> None:
    other = start_server(*SELF_EXTEND_ARGS, "--ga-keys", "cache")
    assert other.json("GET", "/health")[1]["self_extend"]["ga_keys"] == "cache"


def test_models_lists_the_served_model(server: LiveServer) -> None:
    assert [m.id for m in server.client().models.list()] == ["tiny.gguf"]


def test_completion_past_the_trained_context_equals_the_library_with_self_extend(
        server: LiveServer, tiny_model: Path) -> None:
    import selfext_cpp

    got = server.client().completions.create(model="tiny.gguf", prompt=LONG, max_tokens=8, temperature=0,
                                              logprobs=1)

    assert got.usage.prompt_tokens == 151 > N_CTX_TRAIN
    assert got.usage.completion_tokens == 8
    assert got.choices[0].finish_reason == "length"
    library = {}
    for ga_n in (GA_N, 1):
        llm = selfext_cpp.load(tiny_model, ga_n=ga_n, ga_w=GA_W, n_ctx=CAPACITY, n_threads=2, logits_all=True)
        library[ga_n] = llm.create_completion(LONG, max_tokens=8, temperature=0, logprobs=1)["choices"][0]
        llm.close()
    assert got.choices[0].text == library[GA_N]["text"]
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(library[GA_N]["logprobs"]["token_logprobs"],
                                                                   abs=ATOL)
    # and not what vanilla attention gives, so the server has Self-Extend on
    assert got.choices[0].logprobs.token_logprobs != pytest.approx(library[1]["logprobs"]["token_logprobs"],
                                                                   abs=1e-2)


def test_chat_completion_past_the_trained_context(server: LiveServer) -> None:
    got = server.client().chat.completions.create(
        model="tiny.gguf", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "w1 w2"}, {"role": "user", "content": words(100)}])

    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content
    assert got.usage.prompt_tokens > N_CTX_TRAIN
    assert got.usage.completion_tokens <= 8


def test_streaming_completion_equals_the_plain_one(server: LiveServer) -> None:
    client = server.client()
    plain = client.completions.create(prompt=LONG, model="tiny.gguf", max_tokens=8, temperature=0)

    chunks = list(client.completions.create(prompt=LONG, model="tiny.gguf", max_tokens=8, temperature=0,
                                            stream=True))

    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streaming_chat_equals_the_plain_one(server: LiveServer) -> None:
    client = server.client()
    messages = [{"role": "user", "content": words(100, start=7)}]
    plain = client.chat.completions.create(messages=messages, model="tiny.gguf", max_tokens=8, temperature=0)

    chunks = list(client.chat.completions.create(messages=messages, model="tiny.gguf", max_tokens=8,
                                                 temperature=0, stream=True))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_raw_http_completion_and_event_stream(server: LiveServer) -> None:
    body = {"prompt": LONG, "max_tokens": 4, "temperature": 0}
    status, completion = server.json("POST", "/v1/completions", body)
    assert status == 200
    assert completion["object"] == "text_completion"
    assert completion["usage"] == {"prompt_tokens": 151, "completion_tokens": 4, "total_tokens": 155}

    status, headers, stream = server.http("POST", "/v1/completions", {**body, "stream": True})

    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix(b"data: ") for line in stream.splitlines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == completion["choices"][0]["text"]


def test_completion_stops_where_the_capacity_ends(server: LiveServer) -> None:
    got = server.client().completions.create(prompt=words(201), model="tiny.gguf", max_tokens=50, temperature=0)

    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (202, CAPACITY - 202)
    assert got.choices[0].finish_reason == "length"


CAPACITY_MESSAGE = (f"This model's maximum context length is {CAPACITY} tokens, prompt and completion together; "
                    "however your {noun} came to {n} tokens. Self-Extend (--ga-n 4 --ga-w 16) stretches the "
                    f"model's trained {N_CTX_TRAIN} tokens to a capacity of {CAPACITY}, and no further. Shorten "
                    "the {noun}, or restart the server with a larger --auto-max-ctx.")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_beyond_the_capacity_is_a_400_naming_it_and_the_server_stays_up(
        server: LiveServer, path: str, stream: bool) -> None:
    chat = "chat" in path
    body = {"messages": [{"role": "user", "content": TOO_LONG}]} if chat else {"prompt": TOO_LONG}

    status, got = server.json("POST", path, {**body, "max_tokens": 4, "stream": stream})

    noun, n = ("messages", 323) if chat else ("prompt", 241)  # chatml markup: 82 tokens of the tiny vocabulary
    assert (status, got) == (400, {"error": {
        "message": CAPACITY_MESSAGE.format(noun=noun, n=n), "type": "invalid_request_error", "param": noun,
        "code": "context_length_exceeded"}})  # fmt: skip
    small = {"messages": [{"role": "user", "content": "w1"}]} if chat else {"prompt": "w1"}
    assert server.http("POST", path, {**small, "max_tokens": 2, "stream": stream})[0] == 200


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_openai_client_sees_context_length_exceeded(server: LiveServer, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        server.client().completions.create(prompt=TOO_LONG, model="tiny.gguf", max_tokens=4, stream=stream)

    assert err.value.status_code == 400
    assert err.value.code == "context_length_exceeded"


@pytest.mark.parametrize(("raw", "message", "param"), [
    (b'{"prompt": ', "the request body is not JSON: Expecting value: line 1 column 12 (char 11)", None),
    (b'{"prompt": "w1", "max_tokens": "many"}',
     "invalid request: max_tokens: Input should be a valid integer, unable to parse string as an integer",
     "max_tokens"),
    (b"", "the request body is not JSON: Expecting value: line 1 column 1 (char 0)", None),
    (b'{"prompt": "caf\xe9"}', "the request body is not UTF-8 JSON: byte 15 is not UTF-8", None),
], ids=["malformed-json", "wrong-type", "empty-body", "not-utf-8"])  # fmt: skip
def test_bad_request_is_a_400_and_the_server_stays_up(server: LiveServer, raw: bytes, message: str,
                                                      param: str | None) -> None:
    status, got = server.json("POST", "/v1/completions", raw=raw)

    assert (status, got) == (400, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                             "code": None}})
    assert server.json("GET", "/health")[0] == 200


def test_concurrent_requests_all_complete_as_they_would_alone(server: LiveServer) -> None:
    """Requests queue (the server runs one at a time): a stream is not cut short by the next request."""
    prompts = [words(60, start=10 * i) for i in range(4)]
    client = server.client()

    def complete(i: int) -> str:
        kw = {"prompt": prompts[i], "model": "tiny.gguf", "max_tokens": 8, "temperature": 0}
        if i % 2:  # odd ones stream
            return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        return client.completions.create(**kw).choices[0].text

    alone = [complete(i) for i in range(4)]
    began = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(complete, range(4)))

    assert together == alone
    assert time.monotonic() - began < 30  # four 8-token answers take ~1 s on 2 cores


def test_stdout_stays_empty(server: LiveServer) -> None:
    assert server.out_path.read_bytes() == b""
