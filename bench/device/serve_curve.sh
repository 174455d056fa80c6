#!/usr/bin/env bash
# Serving curve on one GPU (after the chunk transfers): Qwen2.5-Coder-1.5B over HTTP,
# HumanEval prompts, concurrency 1..256, with n-gram speculation and without (--baseline), and HF
# transformers' batched generate on the same prompts (--compare-hf).
# The server packages travel as wheels in .whl-serve.
set -uo pipefail
source "$(dirname "$0")/common.sh"  # the shared setup (setup.sh when wheels are carried)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-serve/*.whl >/dev/null
out=${OUT:-/tmp}
timeout ${LIMIT:-420} python3 -m lightspeed.cli bench serve --model qwen2.5-coder-1.5b-instruct --prompts humaneval \
    --concurrency ${LEVELS:-1,4,16,64,128,256} --output-len 256 --speculative ngram --num-speculative-tokens 4 --baseline --compare-hf \
    --max-num-seqs 256 --out $out/serve-qwen1.5b-h200.json 2>&1 | grep -v "it/s" | tail -30
