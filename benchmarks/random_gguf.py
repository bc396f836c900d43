"""Write a random-weight f16 GGUF of a given shape, for speed benchmarks (no download needed).

    python benchmarks/random_gguf.py 1.1b /tmp/llama-1.1b.gguf     # 16 layers, 2048, 16/4 heads, ffn 8192
    python benchmarks/random_gguf.py 8b   /tmp/llama-8b.gguf       # 32 layers, 4096, 32/8 heads, ffn 14336
    python benchmarks/random_gguf.py gemma3-270m /tmp/g.gguf       # Gemma 3 270M: 18 layers (5 local : 1 global),
                                                                   # 640, 4/1 heads of 256, window 512, ffn 2048

Weights are a random block tiled over each tensor (writing 16 GB of fresh random numbers would take minutes and
measure nothing more); scales keep activations O(1). The tokenizer is a minimal SPM vocabulary, so prompts of
any length tokenize. Speed depends on shapes and types only, never on the values.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

SHAPES = {  # n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab (llama; head size n_embd / n_head)
    "1.1b": (16, 2048, 16, 4, 8192, 32000),
    "8b": (32, 4096, 32, 8, 14336, 128256),
    "tiny": (2, 256, 4, 2, 512, 1000),  # for the tests
}
GEMMA3 = {  # n_layer, n_embd, n_head, n_head_kv, head size, n_ff, n_vocab, sliding window (every 6th layer global)
    "gemma3-270m": (18, 640, 4, 1, 256, 2048, 262144, 512),
    "gemma3-tiny": (6, 256, 4, 1, 256, 512, 1000, 64),  # for the tests
}


def spm_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte tokens, then plain pieces: a vocabulary llama.cpp's SPM tokenizer loads."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(n - len(tokens))]
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)  # unknown, control, byte, normal
    return tokens, scores, types


def write(path: str, shape: str, n_ctx_train: int | None = None, seed: int = 0) -> None:
    """n_ctx_train: default 32768 for the Gemma shapes (Gemma 3 270M's), else 8192."""
    import gguf

    gemma = shape in GEMMA3
    n_ctx_train = n_ctx_train or (32768 if gemma else 8192)
    if gemma:
        n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_swa = GEMMA3[shape]
    else:
        n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab = SHAPES[shape]
        head_dim = n_embd // n_head
    block = np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32)

    def w(rows: int, cols: int, std: float) -> np.ndarray:  # ggml [cols, rows]: numpy (rows, cols)
        return np.resize(block * std, (rows, cols)).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    arch = "gemma3" if gemma else "llama"
    wr = gguf.GGUFWriter(path, arch)
    wr.add_name(f"random-{shape}")
    wr.add_context_length(n_ctx_train)
    wr.add_embedding_length(n_embd)
    wr.add_block_count(n_layer)
    wr.add_feed_forward_length(n_ff)
    wr.add_head_count(n_head)
    wr.add_head_count_kv(n_head_kv)
    wr.add_rope_dimension_count(head_dim)
    wr.add_layer_norm_rms_eps(1e-5)
    if gemma:  # as Gemma 3 270M: local layers RoPE base 1e4 within a window, global layers 1e6
        wr.add_key_length(head_dim)
        wr.add_value_length(head_dim)
        wr.add_rope_freq_base(1e6)
        wr.add_float32(f"{arch}.rope.freq_base_swa", 10000.0)
        wr.add_sliding_window(n_swa)
    else:
        wr.add_rope_freq_base(10000.0)
    wr.add_vocab_size(n_vocab)
    wr.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = spm_vocab(n_vocab)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores(scores)
    wr.add_token_types(types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_unk_token_id(0)

    s = 1.0 / np.sqrt(n_embd)
    T = gguf.MODEL_TENSOR

    def name(t: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
        return gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight"

    wr.add_tensor(name(T.TOKEN_EMBD), w(n_vocab, n_embd, s if gemma else 1.0))  # Gemma scales it by sqrt(n_embd)
    for i in range(n_layer):
        wr.add_tensor(name(T.ATTN_NORM, i), ones(n_embd))
        wr.add_tensor(name(T.ATTN_Q, i), w(n_head * head_dim, n_embd, s))
        wr.add_tensor(name(T.ATTN_K, i), w(n_head_kv * head_dim, n_embd, s))
        wr.add_tensor(name(T.ATTN_V, i), w(n_head_kv * head_dim, n_embd, s))
        wr.add_tensor(name(T.ATTN_OUT, i), w(n_embd, n_head * head_dim, 0.5 / np.sqrt(n_head * head_dim)))
        wr.add_tensor(name(T.FFN_NORM, i), ones(n_embd))
        wr.add_tensor(name(T.FFN_GATE, i), w(n_ff, n_embd, s))
        wr.add_tensor(name(T.FFN_UP, i), w(n_ff, n_embd, s))
        wr.add_tensor(name(T.FFN_DOWN, i), w(n_embd, n_ff, 0.5 / np.sqrt(n_ff)))
        if gemma:
            for t in (T.ATTN_Q_NORM, T.ATTN_K_NORM):
                wr.add_tensor(name(t, i), ones(head_dim))
            for t in (T.ATTN_POST_NORM, T.FFN_POST_NORM):
                wr.add_tensor(name(t, i), ones(n_embd))
    wr.add_tensor(name(T.OUTPUT_NORM), ones(n_embd))
    if not gemma:  # Gemma ties the output to the embeddings
        wr.add_tensor(name(T.OUTPUT), w(n_vocab, n_embd, s))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES) + sorted(GEMMA3))
    ap.add_argument("path")
    ap.add_argument("--n-ctx-train", type=int, help="default: 32768 for gemma3 shapes, else 8192")
    args = ap.parse_args()
    write(args.path, args.shape, args.n_ctx_train)
    print(f"wrote {args.path}", file=sys.stderr)


if __name__ == "__main__":
    main()
