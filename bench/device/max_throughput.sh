#!/usr/bin/env bash
# Issue 17 on one H200, in one device call (about 8 minutes): the `gpu` tests of overlap
# scheduling and the FP8 KV cache, the host step per phase (overlap off / on), then offline
# throughput of the Qwen2.5-1.5B shape (random weights, ~150-token prompts like HumanEval's,
# 256 new tokens) at batch 64 / 256 / 512: sequential, overlap, and the max-throughput preset
# (bf16, large batches, streaming every 8 tokens), with HF batched generate as the peer and the PNG curve.
# With the Qwen2.5-Coder-1.5B GGUF in $LIGHTSPEED_HOME (chunks + setup.sh) also: the FP8 KV
# accuracy report and the HTTP curve of the preset. JSON: bench/results/max-throughput-*.json.
#   bash bench/device/max_throughput.sh
#   PARTS=tests,host,offline,accuracy,serve (the default: all): only those parts; INTERVALS="8 1": serve's stream intervals
#   PARTS=fp8kv: offline, the preset with its KV cache in bf16 and in FP8 (the FP8 KV cache's throughput)
#   PARTS=chunks CHUNKS="2048 16384": serve (interval 8, c=256/512) at other --max-num-batched-tokens
#   SKIP_TESTS=1 SHAPE=tiny-llama BATCHES=4,8 OUTPUT_LEN=8 EXTRA="--device cpu" bash bench/device/max_throughput.sh  # CPU smoke
set -uo pipefail
source "$(dirname "$0")/common.sh"
SHAPE=${SHAPE:-qwen2.5-1.5b} BATCHES=${BATCHES:-64,256,512} MODEL=${MODEL:-qwen2.5-coder-1.5b-instruct}
PARTS=${PARTS:-tests,host,offline,accuracy,serve}
[ -n "${SKIP_TESTS:-}" ] && PARTS=${PARTS/tests/}
if [[ $PARTS == *tests* ]]; then
    echo "=== pytest -m gpu  [$(( $(date +%s) - T0 )) s]"
    timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_overlap.py tests/engine/test_fp8_kv.py \
        tests/kernels/test_fp8_kv.py tests/kernels/test_fused_gemv.py tests/structured/test_structured_overlap.py \
        tests/engine/test_cuda_graph.py tests/kernels/test_paged_attention.py 2>&1 | tail -8
fi
host() {  # NAME ARGS...: the host step per phase, JSON into $RES/max-throughput-host-NAME.json
    local name=$1
    shift
    echo "=== host-$name  [$(( $(date +%s) - T0 )) s]"
    timeout 100 python -m lightspeed.bench.host_step --shape "$SHAPE" --steps 50 "$@" ${EXTRA:-} \
        --out "$RES/max-throughput-host-$name.json" 2>&1 | tail -8
    copy "$RES/max-throughput-host-$name.json"
}
if [[ $PARTS == *host* ]]; then
    host offline --batch-sizes 1,64,256
    host stream --batch-sizes 256 --stream --overlap-schedule
    host kernels --batch-sizes 256,512 --overlap-schedule --kernels --input-len 150
fi
OFFLINE="--shape $SHAPE --context-len ${CONTEXT_LEN:-150} --output-len ${OUTPUT_LEN:-256} --batch-size $BATCHES --num-iters 1"
if [[ $PARTS == *offline* ]]; then
    bench max-throughput-offline-sequential 120 $OFFLINE --no-overlap-schedule ${EXTRA:-}
    bench max-throughput-offline-overlap 200 $OFFLINE --overlap-schedule --compare-hf \
        --plot "$RES/max-throughput-offline-overlap.png" ${EXTRA:-}
    copy "$RES/max-throughput-offline-overlap.png"
    bench max-throughput-offline-preset 120 $OFFLINE --preset max-throughput ${EXTRA:-}
fi
if [[ $PARTS == *fp8kv* ]]; then
    bench max-throughput-offline-preset 120 $OFFLINE --preset max-throughput ${EXTRA:-}
    bench max-throughput-offline-preset-fp8kv 120 $OFFLINE --preset max-throughput --kv-cache-dtype fp8 ${EXTRA:-}
fi
if [ -f "${LIGHTSPEED_HOME:-/nonexistent}/models/$MODEL.gguf" ] && [[ $PARTS == *chunks* ]]; then
    for chunk in ${CHUNKS:-2048 16384}; do
        echo "=== serve, --max-num-batched-tokens $chunk  [$(( $(date +%s) - T0 )) s]"
        timeout 200 python -m lightspeed.cli bench serve --model "$MODEL" --preset max-throughput \
            --concurrency 256,512 --prompts humaneval --output-len 256 --server-arg=--max-num-batched-tokens=$chunk \
            --out "$RES/max-throughput-serve-chunk$chunk.json" 2>&1 | tail -4
        copy "$RES/max-throughput-serve-chunk$chunk.json"
    done
fi
if [ -f "${LIGHTSPEED_HOME:-/nonexistent}/models/$MODEL.gguf" ] && [[ $PARTS == *accuracy* ]]; then
    echo "=== fp8 kv accuracy  [$(( $(date +%s) - T0 )) s]"
    timeout 150 python -m lightspeed.cli bench fp8-accuracy --model "$MODEL" --kv-cache-dtype fp8 --prompts humaneval \
        --num-prompts 32 --output-len 128 --out "$RES/max-throughput-fp8kv-accuracy.json" 2>&1 | tail -4
    copy "$RES/max-throughput-fp8kv-accuracy.json"
fi
if [ -f "${LIGHTSPEED_HOME:-/nonexistent}/models/$MODEL.gguf" ] && [[ $PARTS == *serve* ]]; then
    # the preset streams every 8 tokens; every token (interval 1) beside it: what the HTTP path costs
    for interval in ${INTERVALS:-8 1}; do
        echo "=== serve, stream interval $interval  [$(( $(date +%s) - T0 )) s]"
        timeout 200 python -m lightspeed.cli bench serve --model "$MODEL" --preset max-throughput \
            --concurrency 64,256,512 --prompts humaneval --output-len 256 --server-arg=--stream-interval=$interval \
            --out "$RES/max-throughput-serve-interval$interval.json" 2>&1 | tail -6
        copy "$RES/max-throughput-serve-interval$interval.json"
    done
fi
echo "=== summary  [$(( $(date +%s) - T0 )) s]"
python - "$RES" <<'PY'
import json, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob("max-throughput-*.json")):
    for r in json.loads(p.read_text())["results"]:
        keys = ("batch_size", "ms_per_step", "tokens_per_s_server", "host_us_per_step", "device_us_per_step",
                "teacher_forced_agreement")
        print(f"{p.stem[15:]:<22} " + "  ".join(f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), (int, float))))
PY
