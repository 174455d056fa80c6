#!/usr/bin/env bash
# Paged attention on one GPU, in one device call (about 4 minutes): the `gpu` tests of chunked
# attention (Llama 4), verify rows == decode bitwise (Qwen2.5-1.5B shapes, bf16/fp32) and the
# Llama 4 Triton path with speculation; then the paged decode / verify kernel timings at the
# Qwen2.5-1.5B and Llama-3.1-8B shapes (compare with bench/results/kernels-h200.json: decode
# must not be slower). JSON under bench/results/, copied to $OUT when set.
#
#   bash bench/device/attn.sh
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "=== pytest -m gpu (attention, Llama 4, Triton path)"
timeout "${TEST_TIMEOUT:-420}" python -m pytest -q -p no:cacheprovider -m gpu -rfE \
    tests/kernels/test_paged_attention.py tests/models/test_llama4.py tests/models/test_triton_path.py 2>&1 | tail -30
echo "=== paged attention kernels  [$(( $(date +%s) - T0 )) s]"
OUTJ=bench/results/kernels-h200-attn.json
timeout 150 python -m lightspeed.bench.kernels --models qwen2.5-1.5b,llama3.1-8b --no-steps --budget-s 90 \
    --out "$OUTJ" 2>&1 | grep -E "paged|copy|ERROR"
python - "$OUTJ" <<'PY'
import json, sys
new = {(r["model"], r["name"]): r["us"] for r in json.load(open(sys.argv[1]))["results"] if "paged" in r.get("name", "")}
old = {(r["model"], r["name"]): r["us"] for r in json.load(open("bench/results/kernels-h200.json"))["results"]
       if "paged" in r.get("name", "")}
for k, us in new.items():
    print(f"{k[0]:<13} {k[1]:<36} {us:7.2f} us   before {old.get(k, float('nan')):7.2f} us")
PY
if [ -n "${OUT:-}" ] && [ -f "$OUTJ" ]; then cp "$OUTJ" "$OUT/"; fi
