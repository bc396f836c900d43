"""Real model, llama-server: four users at once, each with a pass key past SmolLM2's trained 8K, all found, and
each answer the same as when its request is served alone (greedy). About 15 minutes on 2 CPU cores: slow.
Skipped without llama-server (-DSELFEXT_SERVER=ON).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))  # live_server

from live_server import LiveServer, start  # noqa: E402

from selfext_cpp import llama_server  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(llama_server.binary() is None, reason="llama-server not built (-DSELFEXT_SERVER=ON)")]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEYS = [48213, 70562, 13957, 86420]


def haystack(key: int, i: int) -> str:
    # ~9.5K tokens with SmolLM2's tokenizer; the key a little past the middle, each client's text its own
    return (f"There is an important info hidden inside a lot of irrelevant text (document {i}). "
            "Find it and memorize it. " + FILLER * (190 + 3 * i) + f"The pass key is {key}. Remember it. "
            f"{key} is the pass key. " + FILLER * 180 + "What is the pass key? The pass key is")


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from selfext_cpp.hub import resolve_model

    model = resolve_model(None, progress=False)
    server = start(model, "--parallel", "4", "--auto-max-ctx", "10240", log_dir=tmp_path_factory.mktemp("smol"))
    yield server
    server.stop()


def test_four_users_past_the_trained_context_each_find_their_key_as_if_alone(smollm2_server: LiveServer) -> None:
    client = smollm2_server.client()
    client = client.with_options(timeout=3600)

    def ask(i: int) -> tuple[int, str]:
        r = client.completions.create(model="x", prompt=haystack(KEYS[i], i), max_tokens=6, temperature=0,
                                      extra_body={"cache_prompt": False})  # each read afresh
        return r.usage.prompt_tokens, r.choices[0].text

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4)))
    alone = [ask(i) for i in range(4)]

    for i, ((n, text), (_, text_alone)) in enumerate(zip(together, alone)):
        assert 8192 < n <= 10240
        assert str(KEYS[i]) in text, (i, text)
        assert text == text_alone
