"""A request that shares a long prefix with the previous one reuses its KV cache, and answers as a cold one.

llama-cpp-python keeps the last request's tokens in the Llama and evaluates only what follows the longest
common prefix; with Self-Extend on, the cached keys keep their true positions, so the answer must not change.
Tolerance: the warm request evaluates the suffix in its own batch, the cold one the whole prompt at once; the
f32 CPU kernels give the same result per row either way (observed: bit-identical), 1e-4 allows for a kernel
that sums in another order at another batch size and still catches a wrong position (~1e-1).
"""

from __future__ import annotations

import re

import pytest
from live_server import SELF_EXTEND_ARGS, LiveServer, StartServer, words

ATOL = 1e-4  # see the module docstring
PREFIX = words(150)  # with BOS, 151 tokens: more than twice the trained 64
HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens to eval")


def complete(server: LiveServer, prompt: str) -> tuple[str, list[float]]:
    got = server.client().completions.create(prompt=prompt, model="tiny.gguf", max_tokens=8, temperature=0,
                                             logprobs=1)
    return got.choices[0].text, got.choices[0].logprobs.token_logprobs


def test_warm_request_reuses_the_shared_prefix_and_answers_as_a_cold_one(start_server: StartServer) -> None:
    warm = start_server(*SELF_EXTEND_ARGS, "--logprobs", "--verbose")
    complete(warm, PREFIX + " w700 w701 w702")

    text, logprobs = complete(warm, PREFIX + " w710 w711 w712")

    assert HIT.findall(warm.log())[-1] == ("151", "3")  # all of the prefix reused, the 3 new words evaluated
    cold = start_server(*SELF_EXTEND_ARGS, "--logprobs", "--verbose")
    cold_text, cold_logprobs = complete(cold, PREFIX + " w710 w711 w712")
    assert not HIT.findall(cold.log())
    assert text == cold_text
    assert logprobs == pytest.approx(cold_logprobs, abs=ATOL)
