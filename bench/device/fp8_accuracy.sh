#!/usr/bin/env bash
# FP8 accuracy on one GPU (after the chunk transfers): Qwen2.5-Coder-1.5B and 0.5B, bf16 vs
# --quantization fp8: greedy agreement and KL over 32 HumanEval prompts x 128 tokens, and
# perplexity on 16k tokens of the Python language reference. JSON to bench/results + $OUT.
set -uo pipefail
source "$(dirname "$0")/common.sh"  # the shared setup (setup.sh when wheels are carried)
out=${OUT:-/tmp}
for m in qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct; do
    timeout ${LIMIT:-200} python3 -m lightspeed.cli bench fp8-accuracy --model $m --dtype bfloat16 --num-prompts 32 \
        --output-len 128 --ppl-tokens 16384 --out $out/fp8-accuracy-$m-h200.json 2>&1 | grep -v "it/s" | tail -4
done
# the engine alone at large batch (no HTTP), the ceiling of the server's tokens/s/server
timeout ${LIMIT:-200} python3 -m lightspeed.cli bench latency --model qwen2.5-coder-1.5b-instruct --prompts humaneval \
    --batch-size 64,256 --num-prompts 256 --output-len 256 --num-iters 1 --max-model-len 1024 \
    --out $out/offline-throughput-qwen1.5b-h200.json 2>&1 | grep -v "it/s" | tail -5
