"""With --api-key, every route but /health wants `Authorization: Bearer KEY`."""

from __future__ import annotations

import openai
import pytest
from live_server import SELF_EXTEND_ARGS, LiveServer, StartServer

KEY = "s3cret"


@pytest.fixture(scope="module")
def locked(start_server: StartServer) -> LiveServer:
    return start_server(*SELF_EXTEND_ARGS, "--api-key", KEY)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no-key", "wrong-key"])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                         ("POST", "/v1/chat/completions")])
def test_requests_without_the_key_get_401(locked: LiveServer, method: str, path: str,
                                          headers: dict[str, str]) -> None:
    body = {"prompt": "w1", "messages": [{"role": "user", "content": "w1"}], "max_tokens": 2}

    assert locked.json(method, path, body if method == "POST" else None, headers=headers) == (
        401, {"detail": "Invalid API key"})


def test_openai_client_with_the_wrong_key_gets_authentication_error(locked: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        locked.client(api_key="wrong").completions.create(prompt="w1", model="tiny.gguf", max_tokens=2)


def test_openai_client_with_the_key_is_served(locked: LiveServer) -> None:
    got = locked.client(api_key=KEY).completions.create(prompt="w1 w2", model="tiny.gguf", max_tokens=2)

    assert got.usage.completion_tokens == 2


def test_health_needs_no_key(locked: LiveServer) -> None:
    assert locked.json("GET", "/health")[0] == 200
