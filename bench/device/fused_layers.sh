#!/usr/bin/env bash
# The fused 8-launch decoder layers (kernels/fused_gemv.py) on one GPU, in one device call:
# their GPU tests, the boundary benchmark (the same weight bytes as the model's launches, half
# as many, one launch, a copy), then batch-1 steps at a 1k context with random weights of real
# shapes, fused vs per-op kernels vs PDL off vs graphs off (--ablate), kernels per step, each
# as a fraction of its floor. JSON under bench/results/fused-*.json, copied to $OUT.
#
#   bash bench/device/fused_layers.sh     SKIP_TESTS=1: benches only; SHAPES="a b": the shapes;
#   ABLATE="" FP8="": only fused on / off (--ablate otherwise), no FP8 row
set -uo pipefail
source "$(dirname "$0")/common.sh"

if [ -z "${SKIP_TESTS:-}" ]; then
    echo "=== pytest (gpu)  [$(( $(date +%s) - T0 )) s]"
    timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_fused_gemv.py \
        tests/models/test_triton_path.py tests/engine/test_batch_invariance.py 2>&1 | tail -15
fi
echo "=== boundaries  [$(( $(date +%s) - T0 )) s]"
timeout 120 python -m lightspeed.bench.boundaries --shape qwen2.5-1.5b --out "$RES/fused-boundaries-qwen2.5-1.5b.json" \
    2>&1 | tail -8
copy "$RES/fused-boundaries-qwen2.5-1.5b.json"
COMMON="--context-len ${CONTEXT_LEN:-1024} --output-len ${OUTPUT_LEN:-128} --batch-size 1 --num-iters 2 --step-tokens 1,4"
for s in ${SHAPES:-qwen2.5-1.5b qwen2.5-0.5b llama3.1-8b}; do
    bench "fused-$s-bf16" 150 --shape "$s" $COMMON ${ABLATE---ablate}
done
[ -n "${FP8-1}" ] && bench "fused-llama3.1-8b-fp8" 120 --shape llama3.1-8b --quantization fp8 $COMMON
echo "=== summary  [$(( $(date +%s) - T0 )) s]"
python - "$RES" <<'PY'
import json, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob("fused-*.json")):
    for r in json.loads(p.read_text())["results"]:
        if "ms_per_step" in r and "kind" in r or "launches" in r:
            k = r.get("kernels_per_step", r.get("launches"))
            ms = r.get("ms_per_step", r.get("us", 0) / 1000)
            print(f"{r['name'][:70]:<70} {ms:7.3f} ms  {100 * r['fraction_of_floor']:5.1f}% of floor  {k} kernels")
PY
