"""A tiny random Gemma 3 (llama.cpp's ``gemma3`` architecture) and its float64 NumPy forward pass.

What sets Gemma 3 apart for Self-Extend: sliding-window (local) layers interleaved with global ones, a RoPE base per
kind of layer, one KV head, head sizes that are not n_embd / n_head (256 on Gemma 3 270M), RMS norms on q and k, and
norms after attention and after the FFN. The reference computes Self-Extend on the global layers only: a local layer
never sees a key ``n_swa`` or more positions back, and its window fits the trained context, so it stays vanilla.

Layout of the weights as in tinymodel.py (PyTorch ``[out, in]``); Gemma's GGUF norms already hold ``1 + w``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tinymodel import _spm_vocab, add_spm_tokenizer, self_extend_attention


@dataclass(frozen=True)
class GemmaLayer:
    attn_norm: np.ndarray  # [n_embd]
    wq: np.ndarray  # [n_head * head_dim, n_embd]
    wk: np.ndarray  # [n_head_kv * head_dim, n_embd]
    wv: np.ndarray  # [n_head_kv * head_dim, n_embd]
    q_norm: np.ndarray  # [head_dim]
    k_norm: np.ndarray  # [head_dim]
    wo: np.ndarray  # [n_embd, n_head * head_dim]
    attn_post_norm: np.ndarray  # [n_embd]
    ffn_norm: np.ndarray  # [n_embd]
    w_gate: np.ndarray  # [n_ff, n_embd]
    w_up: np.ndarray  # [n_ff, n_embd]
    w_down: np.ndarray  # [n_embd, n_ff]
    ffn_post_norm: np.ndarray  # [n_embd]


@dataclass(frozen=True)
class TinyGemma:
    path: Path
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rope_theta: float  # global layers
    rope_theta_swa: float  # sliding-window layers
    n_swa: int  # a local layer's query at i sees the keys i - n_swa < j <= i
    swa: tuple[bool, ...]  # per layer: sliding-window (True) or global
    rms_eps: float
    vocab: tuple[str, ...]
    tok_embd: np.ndarray  # [vocab_size, n_embd], also the output projection (tied)
    layers: tuple[GemmaLayer, ...]
    output_norm: np.ndarray  # [n_embd]

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def make_tiny_gemma3(
    path: str | os.PathLike[str],
    *,
    swa: Sequence[bool] = (True, False, True),
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 1,
    head_dim: int = 64,
    n_ff: int = 128,
    vocab_size: int = 300,
    n_ctx_train: int = 64,
    rope_theta: float = 10000.0,
    rope_theta_swa: float = 100.0,
    n_swa: int = 16,
    rms_eps: float = 1e-6,
    seed: int = 0,
) -> TinyGemma:
    """Write a random-weight f32 gemma3 GGUF (layer il is local where swa[il]) and return its weights.

    The two RoPE bases differ by 100x, so a rotation with the wrong layer's base moves logits visibly.
    """

    rng = np.random.default_rng(seed)

    def w(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    s_in = 1.0 / np.sqrt(n_embd)
    layers = tuple(
        GemmaLayer(
            attn_norm=norm(n_embd),
            wq=w(n_head * head_dim, n_embd, std=s_in),
            wk=w(n_head_kv * head_dim, n_embd, std=s_in),
            wv=w(n_head_kv * head_dim, n_embd, std=s_in),
            # q and k are RMS-normed per head: a norm weight ~1.4 gives scores of std ~2 at scale 1/sqrt(head_dim)
            q_norm=(1.4 * norm(head_dim)).astype(np.float32),
            k_norm=(1.4 * norm(head_dim)).astype(np.float32),
            wo=w(n_embd, n_head * head_dim, std=1.0 / np.sqrt(n_head * head_dim)),
            attn_post_norm=(0.5 * norm(n_embd)).astype(np.float32),
            ffn_norm=norm(n_embd),
            w_gate=w(n_ff, n_embd, std=s_in),
            w_up=w(n_ff, n_embd, std=s_in),
            w_down=w(n_embd, n_ff, std=1.0 / np.sqrt(n_ff)),
            ffn_post_norm=(0.5 * norm(n_embd)).astype(np.float32),
        )
        for _ in swa
    )
    vocab, scores, types = _spm_vocab(vocab_size)
    model = TinyGemma(
        path=Path(path), n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff,
        n_ctx_train=n_ctx_train, rope_theta=float(rope_theta), rope_theta_swa=float(rope_theta_swa), n_swa=n_swa,
        swa=tuple(bool(x) for x in swa), rms_eps=float(rms_eps), vocab=tuple(vocab),
        tok_embd=w(vocab_size, n_embd, std=1.5 * s_in), layers=layers, output_norm=norm(n_embd),
    )  # fmt: skip
    _write_gguf(model, scores, types)
    return model


def _write_gguf(m: TinyGemma, scores: list[float], types: list[int]) -> None:
    import gguf

    arch = "gemma3"
    wr = gguf.GGUFWriter(str(m.path), arch)
    wr.add_name("tiny-gemma3")
    wr.add_context_length(m.n_ctx_train)
    wr.add_embedding_length(m.n_embd)
    wr.add_block_count(m.n_layer)
    wr.add_feed_forward_length(m.n_ff)
    wr.add_head_count(m.n_head)
    wr.add_head_count_kv(m.n_head_kv)
    wr.add_key_length(m.head_dim)
    wr.add_value_length(m.head_dim)
    wr.add_rope_dimension_count(m.head_dim)
    wr.add_rope_freq_base(m.rope_theta)
    wr.add_float32(f"{arch}.rope.freq_base_swa", m.rope_theta_swa)
    wr.add_sliding_window(m.n_swa)
    wr.add_array(f"{arch}.attention.sliding_window_pattern", list(m.swa))
    wr.add_layer_norm_rms_eps(m.rms_eps)
    add_spm_tokenizer(wr, m.vocab, scores, types)

    T = gguf.MODEL_TENSOR

    def name(t: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
        return gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight"

    wr.add_tensor(name(T.TOKEN_EMBD), m.tok_embd)
    for i, ly in enumerate(m.layers):
        for t, arr in (
            (T.ATTN_NORM, ly.attn_norm), (T.ATTN_Q, ly.wq), (T.ATTN_K, ly.wk), (T.ATTN_V, ly.wv),
            (T.ATTN_Q_NORM, ly.q_norm), (T.ATTN_K_NORM, ly.k_norm), (T.ATTN_OUT, ly.wo),
            (T.ATTN_POST_NORM, ly.attn_post_norm), (T.FFN_NORM, ly.ffn_norm), (T.FFN_GATE, ly.w_gate),
            (T.FFN_UP, ly.w_up), (T.FFN_DOWN, ly.w_down), (T.FFN_POST_NORM, ly.ffn_post_norm),
        ):  # fmt: skip
            wr.add_tensor(name(t, i), arr)
    wr.add_tensor(name(T.OUTPUT_NORM), m.output_norm)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _gelu_ggml(x: np.ndarray) -> np.ndarray:
    """ggml's GELU as its CPU backend computes it: the tanh approximation, looked up in a table indexed by x rounded
    to f16, whose entries are f16 (outside [-10, 10]: 0 and x)."""
    x16 = x.astype(np.float16).astype(np.float32)
    c = np.float32(np.sqrt(2.0 / np.pi))
    y = np.float32(0.5) * x16 * (np.float32(1.0) + np.tanh(c * x16 * (np.float32(1.0) + np.float32(0.044715) * x16 * x16)))
    y = y.astype(np.float16).astype(np.float64)
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, y))


def gemma_reference_logits(
    model: TinyGemma,
    tokens: Sequence[int],
    positions: Sequence[int] | None = None,
    ga_n: int = 1,
    ga_w: int = 0,
    *,
    self_extend_local: bool = False,
) -> np.ndarray:
    """Float64 logits [n_tokens, vocab] of one causal sequence with Self-Extend on the global layers.

    ``self_extend_local`` also applies it to the sliding-window layers: not what libllama does, only there to show
    that the tests can tell the two apart.
    """
    tok = np.asarray(tokens, dtype=np.int64)
    pos = np.arange(len(tok)) if positions is None else np.asarray(positions, dtype=np.int64)
    n, hd, eps = len(tok), model.head_dim, model.rms_eps
    x = model.tok_embd[tok].astype(np.float64) * np.sqrt(model.n_embd)  # [n, n_embd]
    for local, ly in zip(model.swa, model.layers):
        h = _rms_norm(x, ly.attn_norm, eps)
        q = _rms_norm((h @ ly.wq.astype(np.float64).T).reshape(n, model.n_head, hd), ly.q_norm, eps)
        k = _rms_norm((h @ ly.wk.astype(np.float64).T).reshape(n, model.n_head_kv, hd), ly.k_norm, eps)
        v = (h @ ly.wv.astype(np.float64).T).reshape(n, model.n_head_kv, hd)
        se = not local or self_extend_local
        a = self_extend_attention(
            q, k, v, pos, theta_base=model.rope_theta_swa if local else model.rope_theta, neox=True,
            ga_n=ga_n if se else 1, ga_w=ga_w if se else 0, window=model.n_swa if local else 0,
        )  # fmt: skip
        a = a.reshape(n, model.n_head * hd) @ ly.wo.astype(np.float64).T
        x = x + _rms_norm(a, ly.attn_post_norm, eps)
        h = _rms_norm(x, ly.ffn_norm, eps)
        f = _gelu_ggml(h @ ly.w_gate.astype(np.float64).T) * (h @ ly.w_up.astype(np.float64).T)
        x = x + _rms_norm(f @ ly.w_down.astype(np.float64).T, ly.ffn_post_norm, eps)
    return _rms_norm(x, model.output_norm, eps) @ model.tok_embd.astype(np.float64).T
