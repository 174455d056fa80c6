#!/usr/bin/env bash
# Parity and draft-model latency on one GPU (one device call, after the chunk
# transfers): Qwen2.5-Coder-1.5B parity vs HF, then decode speed on 8 HumanEval prompts,
# plain vs the 0.5B draft at k=2,4,6,8 vs HF transformers. Usage: draft_latency.sh chain|tree
set -uo pipefail
source "$(dirname "$0")/common.sh"  # the shared setup (setup.sh when wheels are carried)
out=${OUT:-/tmp}
M=qwen2.5-coder-1.5b-instruct
D=draft:qwen2.5-coder-0.5b-instruct
common="--model $M --prompts humaneval --num-prompts 8 --output-len 256 --num-iters 1"
case "${1:-chain}" in
chain)
    python3 -m pytest tests/engine/test_real_model.py -m gpu -q -p no:cacheprovider 2>&1 | tail -3 | tee $out/parity.txt
    python3 -m lightspeed.cli bench latency $common --compare-hf --speculative $D --spec-k-list 2,4,6,8 \
        --out $out/latency-qwen1.5b-draft-chain.json 2>&1 | grep -v "it/s" ;;
tree)
    python3 -m lightspeed.cli bench latency $common --speculative $D --num-speculative-tokens 6 \
        --spec-tree-topk 4 --spec-tree-nodes 24 --out $out/latency-qwen1.5b-draft-tree.json 2>&1 | grep -v "it/s"
    python3 -m lightspeed.cli bench latency $common --speculative ngram --spec-k-list 4 \
        --out $out/latency-qwen1.5b-ngram.json 2>&1 | grep -v "it/s" ;;
esac
