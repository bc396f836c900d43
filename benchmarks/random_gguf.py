"""Write a random-weight f16 llama GGUF of a given shape, for speed benchmarks (no download needed).

    python benchmarks/random_gguf.py 1.1b /tmp/llama-1.1b.gguf     # 16 layers, 2048, 16/4 heads, ffn 8192
    python benchmarks/random_gguf.py 8b   /tmp/llama-8b.gguf       # 32 layers, 4096, 32/8 heads, ffn 14336

Weights are a random block tiled over each tensor (writing 16 GB of fresh random numbers would take minutes and
measure nothing more); scales keep activations O(1). The tokenizer is a minimal SPM vocabulary, so prompts of
any length tokenize. Speed depends on shapes and types only, never on the values.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

SHAPES = {  # n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab
    "1.1b": (16, 2048, 16, 4, 8192, 32000),
    "8b": (32, 4096, 32, 8, 14336, 128256),
    "tiny": (2, 256, 4, 2, 512, 1000),  # for the tests
}


def spm_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte tokens, then plain pieces: a vocabulary llama.cpp's SPM tokenizer loads."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(n - len(tokens))]
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)  # unknown, control, byte, normal
    return tokens, scores, types


def write(path: str, shape: str, n_ctx_train: int = 8192, seed: int = 0) -> None:
    import gguf

    n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab = SHAPES[shape]
    head_dim = n_embd // n_head
    block = np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32)

    def w(rows: int, cols: int, std: float) -> np.ndarray:  # ggml [cols, rows]: numpy (rows, cols)
        return np.resize(block * std, (rows, cols)).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    wr = gguf.GGUFWriter(path, "llama")
    wr.add_name(f"random-llama-{shape}")
    wr.add_context_length(n_ctx_train)
    wr.add_embedding_length(n_embd)
    wr.add_block_count(n_layer)
    wr.add_feed_forward_length(n_ff)
    wr.add_head_count(n_head)
    wr.add_head_count_kv(n_head_kv)
    wr.add_rope_dimension_count(head_dim)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-5)
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

    wr.add_tensor(name(T.TOKEN_EMBD), w(n_vocab, n_embd, 1.0))
    for i in range(n_layer):
        wr.add_tensor(name(T.ATTN_NORM, i), ones(n_embd))
        wr.add_tensor(name(T.ATTN_Q, i), w(n_head * head_dim, n_embd, s))
        wr.add_tensor(name(T.ATTN_K, i), w(n_head_kv * head_dim, n_embd, s))
        wr.add_tensor(name(T.ATTN_V, i), w(n_head_kv * head_dim, n_embd, s))
        wr.add_tensor(name(T.ATTN_OUT, i), w(n_embd, n_head * head_dim, 0.5 / np.sqrt(n_embd)))
        wr.add_tensor(name(T.FFN_NORM, i), ones(n_embd))
        wr.add_tensor(name(T.FFN_GATE, i), w(n_ff, n_embd, s))
        wr.add_tensor(name(T.FFN_UP, i), w(n_ff, n_embd, s))
        wr.add_tensor(name(T.FFN_DOWN, i), w(n_embd, n_ff, 0.5 / np.sqrt(n_ff)))
    wr.add_tensor(name(T.OUTPUT_NORM), ones(n_embd))
    wr.add_tensor(name(T.OUTPUT), w(n_vocab, n_embd, s))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("path")
    ap.add_argument("--n-ctx-train", type=int, default=8192)
    args = ap.parse_args()
    write(args.path, args.shape, args.n_ctx_train)
    print(f"wrote {args.path}", file=sys.stderr)


if __name__ == "__main__":
    main()
