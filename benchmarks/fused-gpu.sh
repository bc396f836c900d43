#!/usr/bin/env bash
# The fused Self-Extend path against vanilla flash attention on a GPU, as in docs/RESULTS.md section 4:
# a random-weight f16 model of the given shape (1.1b: llama, 16 layers, 2048, 16/4 heads; 8b: 32 layers, 4096, 32/8;
# gemma3-270m: Gemma 3 270M's 18 layers, 5 sliding-window : 1 global, 4/1 heads of 256), prefill of 2048 tokens and
# 64 single-token decodes at depths 8K and 32K (gemma3-270m: 64K and 128K, 2x and 4x its trained 32K), one process,
# one build; prints medians and selfext/vanilla ratios (add --json for one JSON document).
#   benchmarks/fused-gpu.sh [1.1b|8b|gemma3-270m] [extra `selfext eval speed` options]
set -euo pipefail
shape=${1:-1.1b}; shift || true
case $shape in
    gemma3-*) depths=64k,128k; model=${SELFEXT_BENCH_DIR:-/tmp}/random-$shape.gguf ;;
    *)        depths=8k,32k;   model=${SELFEXT_BENCH_DIR:-/tmp}/random-llama-$shape.gguf ;;
esac
[ -f "$model" ] || python "$(dirname "$0")/random_gguf.py" "$shape" "$model"
exec selfext eval speed "$model" --depths "$depths" --n-prompt 2048 --n-gen 64 --batch-size 2048 --repeats 3 \
    --ga-n 8 --ga-w 1024 --fa on -ngl -1 "$@"
