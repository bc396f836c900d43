"""Tiny random GGUF models, a float64 NumPy reference forward pass (with Self-Extend), and a
low-level llama.cpp runner, for checking our libllama against the maths.

Weights are stored as numpy arrays shaped like PyTorch's ``nn.Linear`` (``[out, in]``); GGUF reverses
the dimensions, so a ``[out, in]`` array is the ggml tensor ``{in, out}`` that llama.cpp expects.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
# SELFEXT_TEST_NGL > 0 runs the llama.cpp side on a GPU build; its matmuls round more than the CPU's
# float32 (observed ~3e-3 on O(1.5) logits on CUDA), so comparisons there use GPU_ATOL
ON_GPU = int(os.environ.get("SELFEXT_TEST_NGL", "0")) != 0
GPU_ATOL = 2e-2
ARCHS = ("llama", "qwen2")  # llama: RoPE NORM (adjacent pairs); qwen2: RoPE NEOX (halves) + q/k/v biases


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor as the pinned ggml.h lays it out: what a graph node's operands and parameters are."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


@dataclass(frozen=True)
class TinyLayer:
    """One decoder block's weights (float32, as written to the GGUF)."""

    attn_norm: np.ndarray  # [n_embd]
    wq: np.ndarray  # [n_head * head_dim, n_embd]
    wk: np.ndarray  # [n_head_kv * head_dim, n_embd]
    wv: np.ndarray  # [n_head_kv * head_dim, n_embd]
    wo: np.ndarray  # [n_embd, n_head * head_dim]
    bq: np.ndarray | None  # [n_head * head_dim]
    bk: np.ndarray | None  # [n_head_kv * head_dim]
    bv: np.ndarray | None  # [n_head_kv * head_dim]
    ffn_norm: np.ndarray  # [n_embd]
    w_gate: np.ndarray  # [n_ff, n_embd]
    w_up: np.ndarray  # [n_ff, n_embd]
    w_down: np.ndarray  # [n_embd, n_ff]


@dataclass(frozen=True)
class TinyModel:
    """Hyperparameters and weights of a model written by :func:`make_tiny_gguf`."""

    path: Path
    arch: str
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    rope_theta: float
    rms_eps: float
    vocab: tuple[str, ...]
    tok_embd: np.ndarray  # [vocab_size, n_embd]
    layers: tuple[TinyLayer, ...]
    output_norm: np.ndarray  # [n_embd]
    output: np.ndarray  # [vocab_size, n_embd]

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def rope_neox(self) -> bool:
        """True when RoPE rotates (i, i + d/2) pairs (NEOX), False for (2i, 2i+1) pairs (NORM)."""
        return self.arch == "qwen2"


# ---------------------------------------------------------------------------------------------
# GGUF writer
# ---------------------------------------------------------------------------------------------

_WORDS = ("▁the", "▁hello", "▁world")  # with every prefix, so SPM's bigram merges can reach them


def _spm_vocab(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """SPM vocab: <unk>, <s>, </s>, 256 byte tokens, then word pieces; scores and token types."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    prefixes = dict.fromkeys(w[:n] for w in _WORDS for n in range(2, len(w) + 1))
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", *prefixes]
    n_pieces = vocab_size - len(tokens)
    if n_pieces < 1:
        raise ValueError(f"vocab_size must be > {len(tokens)} (specials + bytes), got {vocab_size}")
    pieces += [f"▁w{i}" for i in range(max(0, n_pieces - len(pieces)))]
    tokens += pieces[:n_pieces]
    types += [gguf.TokenType.NORMAL] * n_pieces
    scores = [0.0] * 259 + [-float(i) for i in range(n_pieces)]  # earlier pieces merge first
    return tokens, scores, [int(t) for t in types]


def make_tiny_gguf(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_ff: int = 128,
    vocab_size: int = 300,
    n_ctx_train: int = 64,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-5,
    seed: int = 0,
    kv_bias: bool | None = None,
) -> TinyModel:
    """Write a random-weight f32 GGUF that llama.cpp loads, and return its weights.

    ``kv_bias`` adds q/k/v biases; None means the architecture's default (qwen2: yes, llama: no).
    Scales are chosen so attention scores have std ~2 (RoPE positions visibly matter) and logits are O(1).
    """

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise ValueError("need n_head | n_embd, n_head_kv | n_head and an even head_dim")
    kv_bias = (arch == "qwen2") if kv_bias is None else kv_bias
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head

    def w(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.standard_normal(n_embd) * 0.1).astype(np.float32)

    def bias(n: int) -> np.ndarray | None:
        return w(n, std=0.1) if kv_bias else None

    s_in = 1.0 / np.sqrt(n_embd)
    layers = tuple(
        TinyLayer(
            attn_norm=norm(),
            wq=w(n_head * head_dim, n_embd, std=1.2 * s_in),
            wk=w(n_head_kv * head_dim, n_embd, std=1.2 * s_in),
            wv=w(n_head_kv * head_dim, n_embd, std=s_in),
            wo=w(n_embd, n_head * head_dim, std=0.5 / np.sqrt(n_head * head_dim)),
            bq=bias(n_head * head_dim),
            bk=bias(n_head_kv * head_dim),
            bv=bias(n_head_kv * head_dim),
            ffn_norm=norm(),
            w_gate=w(n_ff, n_embd, std=s_in),
            w_up=w(n_ff, n_embd, std=s_in),
            w_down=w(n_embd, n_ff, std=0.5 / np.sqrt(n_ff)),
        )
        for _ in range(n_layer)
    )
    vocab, scores, types = _spm_vocab(vocab_size)
    model = TinyModel(
        path=Path(path), arch=arch, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
        n_ctx_train=n_ctx_train, rope_theta=float(rope_theta), rms_eps=float(rms_eps), vocab=tuple(vocab),
        tok_embd=w(vocab_size, n_embd, std=1.0), layers=layers, output_norm=norm(),
        output=w(vocab_size, n_embd, std=1.5 * s_in),
    )  # fmt: skip
    _write_gguf(model, scores, types)
    return model


def add_spm_tokenizer(wr: Any, vocab: Sequence[str], scores: list[float], types: list[int]) -> None:
    """An f32 file's type and the tiny SPM tokenizer of :func:`_spm_vocab` (UNK 0, BOS 1 added, EOS 2)."""
    import gguf

    wr.add_vocab_size(len(vocab))
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(list(vocab))
    wr.add_token_scores(scores)
    wr.add_token_types(types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_unk_token_id(0)
    wr.add_add_bos_token(True)


def _write_gguf(m: TinyModel, scores: list[float], types: list[int]) -> None:
    import gguf

    def name(t: gguf.MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
        return gguf.TENSOR_NAMES[t].format(bid=bid) + "." + suffix

    wr = gguf.GGUFWriter(str(m.path), m.arch)
    wr.add_name(f"tiny-{m.arch}")
    wr.add_context_length(m.n_ctx_train)
    wr.add_embedding_length(m.n_embd)
    wr.add_block_count(m.n_layer)
    wr.add_feed_forward_length(m.n_ff)
    wr.add_head_count(m.n_head)
    wr.add_head_count_kv(m.n_head_kv)
    wr.add_rope_dimension_count(m.head_dim)
    wr.add_rope_freq_base(m.rope_theta)
    wr.add_layer_norm_rms_eps(m.rms_eps)
    add_spm_tokenizer(wr, m.vocab, scores, types)

    T = gguf.MODEL_TENSOR
    wr.add_tensor(name(T.TOKEN_EMBD, "weight"), m.tok_embd)
    for i, ly in enumerate(m.layers):
        for t, suffix, arr in (
            (T.ATTN_NORM, "weight", ly.attn_norm), (T.ATTN_Q, "weight", ly.wq), (T.ATTN_K, "weight", ly.wk),
            (T.ATTN_V, "weight", ly.wv), (T.ATTN_Q, "bias", ly.bq), (T.ATTN_K, "bias", ly.bk),
            (T.ATTN_V, "bias", ly.bv), (T.ATTN_OUT, "weight", ly.wo), (T.FFN_NORM, "weight", ly.ffn_norm),
            (T.FFN_GATE, "weight", ly.w_gate), (T.FFN_UP, "weight", ly.w_up), (T.FFN_DOWN, "weight", ly.w_down),
        ):  # fmt: skip
            if arr is not None:
                wr.add_tensor(name(t, suffix, i), arr)
    wr.add_tensor(name(T.OUTPUT_NORM, "weight"), m.output_norm)
    wr.add_tensor(name(T.OUTPUT, "weight"), m.output)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# ---------------------------------------------------------------------------------------------
# NumPy reference (float64), written from the maths
# ---------------------------------------------------------------------------------------------


def rope(x: np.ndarray, pos: np.ndarray, *, theta_base: float, neox: bool) -> np.ndarray:
    """Rotate x [n, heads, d] by position pos [n]: pair i turns by pos * theta_base^(-2i/d).

    NORM pairs are (2i, 2i+1); NEOX pairs are (i, i + d/2).
    """
    d = x.shape[-1]
    inv_freq = theta_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    ang = np.asarray(pos, dtype=np.float64)[:, None, None] * inv_freq  # [n, 1, d/2]
    cos, sin = np.cos(ang), np.sin(ang)
    idx0, idx1 = (np.arange(d // 2), np.arange(d // 2, d)) if neox else (np.arange(0, d, 2), np.arange(1, d, 2))
    x0, x1 = x[..., idx0], x[..., idx1]
    out = np.empty_like(x, dtype=np.float64)
    out[..., idx0] = x0 * cos - x1 * sin
    out[..., idx1] = x0 * sin + x1 * cos
    return out


def self_extend_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    positions: np.ndarray,
    *,
    theta_base: float,
    neox: bool,
    ga_n: int = 1,
    ga_w: int = 0,
    window: int = 0,
) -> np.ndarray:
    """Causal attention of un-rotated q [n, H, d] over k, v [n, Hkv, d]; returns [n, H, d].

    Self-Extend (group size G = ga_n, neighbour window W = ga_w), for query position i, key position j:
    if i - j < W the score uses q at i and k at j (plain RoPE); otherwise q at i//G + W - W//G and k at
    j//G. Scores are merged per (i, j), scaled by 1/sqrt(d), masked (j <= i), and go through one softmax.
    ``window`` > 0 is a sliding window: keys with i - j >= window are masked too.
    """
    if ga_n < 1 or ga_w < 0:
        raise ValueError(f"need ga_n >= 1 and ga_w >= 0, got ga_n={ga_n}, ga_w={ga_w}")
    n, n_head, d = q.shape
    rep = n_head // k.shape[1]  # GQA: query head h reads kv head h // rep
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # [n, H, d]
    pos = np.asarray(positions, dtype=np.int64)  # [n]

    def rot(x: np.ndarray, p: np.ndarray) -> np.ndarray:
        return rope(x, p, theta_base=theta_base, neox=neox)

    s_near = np.einsum("ihd,jhd->hij", rot(q, pos), rot(k, pos))  # [H, n_q, n_k]
    q_far = rot(q, pos // ga_n + ga_w - ga_w // ga_n)
    s_far = np.einsum("ihd,jhd->hij", q_far, rot(k, pos // ga_n))  # [H, n_q, n_k]
    dist = pos[:, None] - pos[None, :]  # [n_q, n_k]: i - j
    scores = np.where(dist < ga_w, s_near, s_far) / np.sqrt(d)
    visible = (dist >= 0) & ((dist < window) if window > 0 else True)  # causal by position, sliding window
    scores = np.where(visible, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", p, v)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.astype(np.float64).T
    return y if b is None else y + b


def reference_logits(
    model: TinyModel,
    tokens: Sequence[int],
    positions: Sequence[int] | None = None,
    ga_n: int = 1,
    ga_w: int = 0,
) -> np.ndarray:
    """Float64 logits [n_tokens, vocab] of one causal sequence, with Self-Extend attention (G=1: vanilla)."""
    tok = np.asarray(tokens, dtype=np.int64)
    pos = np.arange(len(tok)) if positions is None else np.asarray(positions, dtype=np.int64)
    if pos.shape != tok.shape:
        raise ValueError(f"{len(tok)} tokens but {len(pos)} positions")
    n, hd, eps = len(tok), model.head_dim, model.rms_eps
    x = model.tok_embd[tok].astype(np.float64)  # [n, n_embd]
    for ly in model.layers:
        h = _rms_norm(x, ly.attn_norm, eps)
        q = _linear(h, ly.wq, ly.bq).reshape(n, model.n_head, hd)
        k = _linear(h, ly.wk, ly.bk).reshape(n, model.n_head_kv, hd)
        v = _linear(h, ly.wv, ly.bv).reshape(n, model.n_head_kv, hd)
        a = self_extend_attention(
            q, k, v, pos, theta_base=model.rope_theta, neox=model.rope_neox, ga_n=ga_n, ga_w=ga_w
        )
        x = x + _linear(a.reshape(n, model.n_head * hd), ly.wo)
        h = _rms_norm(x, ly.ffn_norm, eps)
        gate = _linear(h, ly.w_gate)
        x = x + _linear(gate / (1.0 + np.exp(-gate)) * _linear(h, ly.w_up), ly.w_down)  # SwiGLU
    return _linear(_rms_norm(x, model.output_norm, eps), model.output)


# ---------------------------------------------------------------------------------------------
# llama.cpp runner (low-level llama-cpp-python API)
# ---------------------------------------------------------------------------------------------


class LlamaRunner:
    """A llama_model + llama_context over our libllama (selfext_cpp's), for tests.

    ``ctx`` is the raw ``llama_context *`` (for our C API); every decoded token returns its logits.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 128,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
        n_seq_max: int = 1,
        flash_attn: bool = False,
        type_k: int = GGML_TYPE_F32,
        type_v: int = GGML_TYPE_F32,
        kv_unified: bool = False,
        swa_full: bool = True,
        n_threads: int = 2,
        verbose: bool = False,
        on_node: Callable[[str], None] | None = None,
        on_tensor: Callable[[GgmlTensor], None] | None = None,
    ) -> None:
        """``on_node``: called with the name of every node that a llama_decode computes (llama.cpp's cb_eval);
        ``on_tensor``: with the node itself."""
        from selfext_cpp._lib import load_llama_cpp

        llama_cpp = load_llama_cpp()  # our libllama, before anything imports llama_cpp
        import llama_cpp._logger

        llama_cpp._logger.set_verbose(verbose)
        self._ll: Any = llama_cpp.llama_cpp
        ll = self._ll
        ll.llama_backend_init()
        self.model: Any = None
        self.ctx: Any = None
        self._batch: Any = None

        mparams = ll.llama_model_default_params()
        # SELFEXT_TEST_NGL=99 runs the same tests on a GPU build with every layer offloaded
        mparams.n_gpu_layers = int(os.environ.get("SELFEXT_TEST_NGL", "0"))
        self.model = ll.llama_model_load_from_file(os.fsencode(path), mparams)
        if not self.model:
            raise RuntimeError(f"llama_model_load_from_file failed for {path}")
        n_batch = n_batch or n_ctx
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_ubatch or n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = cparams.n_threads_batch = n_threads
        fa_on, fa_off = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED, ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.flash_attn_type = fa_on if flash_attn else fa_off  # AUTO would turn FA on for CPU
        cparams.type_k, cparams.type_v = type_k, type_v
        cparams.kv_unified = kv_unified
        cparams.swa_full = swa_full  # False: sliding-window layers get a cache of about their window only
        self._cb_eval: Any = None
        if on_node is not None or on_tensor is not None:

            def cb_eval(t: int, ask: bool, user_data: int) -> bool:
                if ask:  # the scheduler asks once per node whether we want its data: no, so it runs all at once
                    node = GgmlTensor.from_address(t)
                    if on_node is not None:
                        on_node(node.name.decode())
                    if on_tensor is not None:
                        on_tensor(node)
                return False

            self._cb_eval = ll.ggml_backend_sched_eval_callback(cb_eval)  # kept alive with the context
            cparams.cb_eval = self._cb_eval
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise RuntimeError(f"llama_init_from_model failed for {path} (n_ctx={n_ctx}, n_batch={n_batch})")
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.n_vocab: int = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self._batch = ll.llama_batch_init(n_batch, 0, n_seq_max)

    @property
    def memory(self) -> Any:
        """The context's ``llama_memory_t`` (the KV cache)."""
        return self._ll.llama_get_memory(self.ctx)

    def decode_batch(
        self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int]
    ) -> np.ndarray:
        """One llama_decode of tokens[i] at positions[i] in sequence seq_ids[i]; logits [n, vocab] (float32)."""
        n = len(tokens)
        if not 0 < n <= self.n_batch or len(positions) != n or len(seq_ids) != n:
            raise ValueError(f"need 1..{self.n_batch} tokens with one position and seq_id each")
        b = self._batch
        b.n_tokens = n
        for i, (t, p, s) in enumerate(zip(tokens, positions, seq_ids)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, 1
            b.seq_id[i][0] = s
        rc = self._ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = np.empty((n, self.n_vocab), dtype=np.float32)
        for i in range(n):
            ptr = ctypes.cast(self._ll.llama_get_logits_ith(self.ctx, i), ctypes.POINTER(ctypes.c_float))
            out[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int] | None = None,
        *,
        seq_id: int = 0,
        chunk: int | None = None,
    ) -> np.ndarray:
        """Decode one sequence in llama_decode calls of ``chunk`` tokens (default n_batch); logits [n, vocab].

        Positions default to continuing after the sequence's last cell.
        """
        if positions is None:
            start = self.seq_pos_max(seq_id) + 1
            positions = range(start, start + len(tokens))
        step = chunk or self.n_batch
        parts = []
        for i in range(0, len(tokens), step):
            part = tokens[i : i + step]
            parts.append(self.decode_batch(part, positions[i : i + step], [seq_id] * len(part)))
        return np.concatenate(parts) if parts else np.empty((0, self.n_vocab), dtype=np.float32)

    def set_self_extend(self, ga_n: int, ga_w: int) -> int:
        """llama_set_self_extend on this context; returns its status (0 = ok)."""
        from selfext_cpp import capi

        return int(capi.llama_set_self_extend(self.ctx, ga_n, ga_w))

    @property
    def fused(self) -> bool:
        """Whether the Self-Extend layers run the fused flash-attention op."""
        from selfext_cpp import capi

        return bool(capi.llama_self_extend_fused(self.ctx))

    def set_keys(self, keys: str) -> int:
        """llama_set_self_extend_keys with a form named as selfext_cpp.engine.KEYS_FORMS; returns its status."""
        from selfext_cpp import capi
        from selfext_cpp.engine import check_keys

        return int(capi.llama_set_self_extend_keys(self.ctx, check_keys(keys)))

    @property
    def keys(self) -> str | None:
        """The form of the grouped keys in use, None without the fused path (selfext_cpp.engine.self_extend_keys,
        which reads only the context)."""
        from selfext_cpp.engine import self_extend_keys

        return self_extend_keys(self)  # type: ignore[arg-type]

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove the sequence's cells with positions in [p0, p1) (-1: open end)."""
        return bool(self._ll.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift the positions of the sequence's cells in [p0, p1) by delta (K is re-rotated lazily)."""
        self._ll.llama_memory_seq_add(self.memory, seq_id, p0, p1, delta)

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position stored for the sequence, -1 when empty."""
        return int(self._ll.llama_memory_seq_pos_max(self.memory, seq_id))

    def clear(self) -> None:
        """Empty the KV cache."""
        self._ll.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        if self._batch is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            self._ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self._ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RunnerFactory = Callable[..., LlamaRunner]  # the runner_for fixture (conftest.py)
