"""Helpers for the CLI tests: a no-RoPE GGUF writer, a clean subprocess environment, error-line checks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
from tinymodel import _spm_vocab
from typer.testing import Result

TINY_L = 256  # n_ctx_train of the tiny llama model: W = 64 and G = 4 reach (256 - 64)·4 + 64 = 832 tokens

Invoke = Callable[..., Result]  # the `cli` fixture
Selfext = Callable[..., "subprocess.CompletedProcess[str]"]  # the `selfext` fixture


def make_gpt2_gguf(path: Path, *, n_ctx_train: int = 64, n_embd: int = 32, n_head: int = 2, n_ff: int = 64,
                   vocab_size: int = 300) -> None:
    import gguf

    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:  # [out, in] as in PyTorch; GGUF stores ggml {in, out}
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    tokens, scores, types = _spm_vocab(vocab_size)
    wr = gguf.GGUFWriter(str(path), "gpt2")
    wr.add_context_length(n_ctx_train)
    wr.add_embedding_length(n_embd)
    wr.add_block_count(1)
    wr.add_feed_forward_length(n_ff)
    wr.add_head_count(n_head)
    wr.add_layer_norm_eps(1e-5)
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores(scores)
    wr.add_token_types(types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    tensors = {
        "token_embd.weight": w(vocab_size, n_embd), "position_embd.weight": w(n_ctx_train, n_embd),
        "output_norm.weight": w(n_embd), "output_norm.bias": w(n_embd),
        "blk.0.attn_norm.weight": w(n_embd), "blk.0.attn_norm.bias": w(n_embd),
        "blk.0.attn_qkv.weight": w(3 * n_embd, n_embd), "blk.0.attn_qkv.bias": w(3 * n_embd),
        "blk.0.attn_output.weight": w(n_embd, n_embd), "blk.0.attn_output.bias": w(n_embd),
        "blk.0.ffn_norm.weight": w(n_embd), "blk.0.ffn_norm.bias": w(n_embd),
        "blk.0.ffn_up.weight": w(n_ff, n_embd), "blk.0.ffn_up.bias": w(n_ff),
        "blk.0.ffn_down.weight": w(n_embd, n_ff), "blk.0.ffn_down.bias": w(n_embd),
    }  # fmt: skip
    for name, arr in tensors.items():
        wr.add_tensor(name, arr)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def base_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: no proxy, no token, no real Hub, no debug tracebacks."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HF_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
           and k != "SELFEXT_DEBUG"}
    env.update(NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               HF_ENDPOINT="http://127.0.0.1:9", PYTHONIOENCODING="utf-8")  # port 9: nothing listens
    env.update(extra)
    return env


def one_error_line(stderr: str) -> str:
    """The single ``selfext: error: ...`` line of ``stderr`` (asserting there is nothing else)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("selfext: error: "), lines[0]
    return lines[0]
