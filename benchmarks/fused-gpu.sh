#!/usr/bin/env bash
# The fused Self-Extend path against vanilla flash attention on a GPU, as in docs/RESULTS.md section 4:
# a random-weight f16 llama of the given shape (1.1b: 16 layers, 2048, 16/4 heads; 8b: 32 layers, 4096, 32/8),
# prefill of 2048 tokens and 64 single-token decodes at depths 8K and 32K, one process, one build; prints
# medians and selfext/vanilla ratios (add --json for one JSON document).
#   benchmarks/fused-gpu.sh [1.1b|8b] [extra `selfext eval speed` options]
set -euo pipefail
shape=${1:-1.1b}; shift || true
model=${SELFEXT_BENCH_DIR:-/tmp}/random-llama-$shape.gguf
[ -f "$model" ] || python "$(dirname "$0")/random_gguf.py" "$shape" "$model"
exec selfext eval speed "$model" --depths 8k,32k --n-prompt 2048 --n-gen 64 --batch-size 2048 --repeats 3 \
    --ga-n 8 --ga-w 1024 --fa on -ngl -1 "$@"
