#!/usr/bin/env bash
# Batch-1 decode step latency on one GPU, in one device call (about 5 minutes): the `gpu` tests, then batch-1
# decode at a 1k-token context with random weights of real shapes, each as a fraction of
# its floor ((weight bytes + KV bytes) / copy bandwidth measured in the same run):
#   Llama-3.1-8B shape bf16: graphs + PDL on, PDL off, graphs off (--ablate)
#   the same with FP8 weights
#   Qwen2.5-1.5B shape bf16 (+ ablations, + HF transformers eager on the same weights)
# JSON under bench/results/issue4-*.json, copied to $OUT when set.
#
#   bash bench/device/step_latency.sh            # everything
#   SKIP_TESTS=1 bash bench/device/step_latency.sh     # benches only;  ONLY_TESTS=1: tests only
#   SKIP_TESTS=1 BIG=tiny-llama SMALL=tiny-qwen2 CONTEXT_LEN=128 OUTPUT_LEN=16 EXTRA="--device cpu" bash bench/device/step_latency.sh  # CPU smoke
set -uo pipefail
source "$(dirname "$0")/common.sh"

if [ -z "${SKIP_TESTS:-}" ]; then
    echo "=== pytest -m gpu  [$(( $(date +%s) - T0 )) s]"
    timeout "${TEST_TIMEOUT:-150}" python -m pytest tests -m gpu -q -p no:cacheprovider --ignore=tests/server 2>&1 | tail -25
fi
[ -n "${ONLY_TESTS:-}" ] && exit 0

HF=""
python -c "import transformers" 2>/dev/null && HF="--compare-hf"
BIG=${BIG:-llama3.1-8b} SMALL=${SMALL:-qwen2.5-1.5b}
COMMON="--context-len ${CONTEXT_LEN:-1024} --output-len ${OUTPUT_LEN:-256} --batch-size 1 --num-iters 3 --ablate ${EXTRA:-}"
bench "issue4-$BIG-bf16" 110 --shape "$BIG" $COMMON
bench "issue4-$BIG-fp8" 110 --shape "$BIG" --quantization fp8 $COMMON
bench "issue4-$SMALL-bf16" 100 --shape "$SMALL" $COMMON $HF

echo "=== summary  [$(( $(date +%s) - T0 )) s]"
python - "$RES" "$BIG" "$SMALL" <<'EOF'
import json, sys
from pathlib import Path
rows = {}
big, small = sys.argv[2], sys.argv[3]
for name in (f"{big}-bf16", f"{big}-fp8", f"{small}-bf16"):
    p = Path(sys.argv[1]) / f"issue4-{name}.json"
    if not p.exists():
        print(f"{name}: no result"); continue
    r = json.loads(p.read_text())
    for row in r["results"]:
        rows[row["name"]] = row
        peer = f"  HF {row['peer_tokens_per_s_user']:.1f} tok/s" if "peer_tokens_per_s_user" in row else ""
        same = "" if "outputs_identical_to_plain" not in row else f"  same tokens: {row['outputs_identical_to_plain']}"
        print(f"{row['name']:<62} {row['ms_per_step']:7.3f} ms  floor {row['floor_ms_per_step']:6.3f} ms  "
              f"{100 * row['fraction_of_floor']:5.1f}%  {row['tokens_per_s_user']:7.1f} tok/s{peer}{same}")
    print(f"  device {r['device']}, copy {row['copy_bandwidth_gb_s']:.0f} GB/s, commit {r['git_commit']}")
base = lambda q: [r for n, r in rows.items() if n.startswith(f"{big} {q} ") and "speedup_vs_plain" not in r]
bf, f8 = base("none"), base("fp8")
if bf and f8:
    print(f"fp8 vs bf16 ({big}): {bf[0]['ms_per_step'] / f8[0]['ms_per_step']:.2f}x faster (target 1.8x)")
EOF
