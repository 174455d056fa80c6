#!/usr/bin/env bash
# Issue 19 on one node: Llama-4-Maverick shape in FP8 across all visible GPUs with tensor /
# expert parallelism (lightspeed/bench/tp_maverick.py says what each part measures):
#   1. correct     TP = N (and 2) == TP = 1 greedy on a tiny Llama 4 (EP and TP-in-expert) and
#                  on Qwen2.5-Coder-1.5B at TP = 2; then the `gpu`-marked parallel tests
#   2. allreduce   one-shot (symmetric memory, no multicast) vs NCCL in CUDA graphs, 5120 / 8192 bf16
#   3-5. steps     Maverick shape FP8 random weights built on the GPUs, 1k context: decode and
#                  4-token verify ms vs floor (EP, TP-in-expert, PDL off, graphs off), the
#                  projection at AL 2.9-3.1, tokens/s/server at batch 64-256
# One device call is at most 10 minutes: run PARTS=correct,allreduce first, then PARTS=steps
# (ABLATE=0 drops the PDL / graph ablations; SHAPE=llama4-maverick@24 halves the build).
#   PARTS=correct,allreduce bash bench/device/tp_maverick.sh     # ~3 min
#   PARTS=steps bash bench/device/tp_maverick.sh                 # ~8 min on 8 GPUs
#   WORLD=1 bash bench/device/tp_maverick.sh                     # the same end to end on one GPU
#   WORLD=2 EXTRA="--device cpu --shape tiny-llama4-8e --context 32 --batches 4 --reps 3" \
#       QWEN= PARTS=correct,allreduce,steps bash bench/device/tp_maverick.sh   # CPU smoke (gloo)
# JSON: bench/results/tp_maverick-tpN-PARTS.json (copied to $OUT).
set -uo pipefail
source "$(dirname "$0")/common.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # NVLink multicast stays off
export LIGHTSPEED_HOME=${LIGHTSPEED_HOME:-/tmp/lshome}
WORLD=${WORLD:-$(nvidia-smi -L 2>/dev/null | wc -l)}
PARTS=${PARTS:-correct,allreduce,steps} ABLATE=${ABLATE:-1} EXTRA=${EXTRA:-}
QWEN=${QWEN-qwen2.5-coder-1.5b-instruct}
NAME=tp_maverick-tp$WORLD-${PARTS//,/-}
if [[ $PARTS == *correct* && $EXTRA != *cpu* ]]; then
    echo "=== gpu-marked parallel tests  [$(( $(date +%s) - T0 )) s]"
    timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/distributed 2>&1 | tail -5
fi
echo "=== $NAME  [$(( $(date +%s) - T0 )) s]"
timeout 560 python -m lightspeed.bench.tp_maverick --world "$WORLD" --parts "$PARTS" ${QWEN:+--qwen "$QWEN"} \
    ${SHAPE:+--shape "$SHAPE"} $([ "$ABLATE" = 0 ] && echo --no-ablate) $EXTRA --out "$RES/$NAME.json" 2>&1 | tail -40
copy "$RES/$NAME.json"
echo "=== done  [$(( $(date +%s) - T0 )) s]"
