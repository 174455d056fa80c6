#!/usr/bin/env bash
# The speculative GPU path (cost, speed, exactness), in one device call (under 8 minutes):
#   1. cost of the batch-invariant GEMV vs cuBLAS at Qwen2.5-1.5B shapes (M = 1 and 5)
#   2. eval-spec, Qwen2.5-Coder-1.5B-Instruct, 8 HumanEval prompts x 256 tokens, batch 1,
#      greedy, bf16, batch-invariant: plain, 0.5B draft k = 4, 6 and a 2x6x12 tree, n-gram
#      k = 4; tok/s/user, AL and how many outputs are token-identical to plain (first differences)
#   3. the `gpu` tests of that path: draft-loop CUDA graphs vs eager (draft model, EAGLE-3),
#      device verification vs the host verifiers, batch-invariant GEMV rows at
#      Qwen2.5-1.5B shapes, graph verify vs eager, whole-model verify rows == decode steps
#      (tests/engine/test_batch_invariance.py), the attention kernels
# JSON under bench/results/issue4-spec-*.json, copied to $OUT when set.
#
#   bash bench/device/spec_eval.sh           # everything;  SKIP_TESTS=1: benches only
set -uo pipefail
source "$(dirname "$0")/common.sh"
export LIGHTSPEED_HOME=${LIGHTSPEED_HOME:-/tmp/lshome}
stamp() { echo "=== $1  [$(( $(date +%s) - T0 )) s]"; }

stamp "batch-invariant GEMV vs cuBLAS, Qwen2.5-1.5B shapes (us per call, CUDA graph, weights out of L2)"
timeout 20 python3 - "$RES" <<'EOF'
import sys, torch, torch.nn.functional as F
from lightspeed import kernels
from lightspeed.bench.results import save_results
from lightspeed.layers.linear import _graph_time
shapes = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960), "lm_head": (151936, 1536)}
tot, rows = {}, []
for name, (n, k) in shapes.items():
    copies = max(1, min(16, -(-4 * torch.cuda.get_device_properties(0).L2_cache_size // (n * k * 2))))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    line = []
    for m in (1, 5):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cub = _graph_time(lambda: [F.linear(x, w) for w in ws], 20) / copies
        inv = _graph_time(lambda: [kernels.gemv(x, w, batch_invariant=True) for w in ws], 20) / copies
        tot[m] = [a + b for a, b in zip(tot.get(m, [0, 0]), (cub, inv))]
        rows.append(dict(name=f"batch-invariant gemv {name} {n}x{k} M={m}", shape=name, n=n, k=k, m=m,
                         dtype="bfloat16", cublas_us=round(cub, 1), gemv_batch_invariant_us=round(inv, 1)))
        line.append(f"M={m}: cuBLAS {cub:7.1f}  invariant GEMV {inv:7.1f}")
    print(f"{name:8s} {n:6d}x{k:<5d} " + "   ".join(line))
for m, (c, g) in tot.items():
    rows.append(dict(name=f"batch-invariant gemv sum of the 5 shapes M={m}", m=m, dtype="bfloat16",
                     cublas_us=round(c, 1), gemv_batch_invariant_us=round(g, 1)))
print("sum of the 5 shapes: " + "   ".join(f"M={m}: cuBLAS {c:.1f} us, GEMV {g:.1f} us" for m, (c, g) in tot.items()))
save_results(f"{sys.argv[1]}/issue4-spec-gemv-cost.json", torch.device("cuda"), rows,
             command="bash bench/device/spec_eval.sh (step 1: batch-invariant GEMV vs cuBLAS, us per call, CUDA graph, "
                     "weights out of L2)")
EOF
[ -n "${OUT:-}" ] && cp "$RES/issue4-spec-gemv-cost.json" "$OUT/" 2>/dev/null

stamp "eval-spec: plain, 0.5B draft chains and tree, n-gram (8 HumanEval prompts x 256, greedy, batch 1)"
timeout "${EVAL_TIMEOUT:-200}" python3 -m lightspeed.cli eval-spec --model qwen2.5-coder-1.5b-instruct --prompts humaneval \
    --num-prompts 8 --output-len 256 --speculative none --speculative draft:qwen2.5-coder-0.5b-instruct@k=4,6 \
    --speculative draft:qwen2.5-coder-0.5b-instruct@tree=2x6x12 \
    --speculative draft:qwen2.5-coder-0.5b-instruct@tree=4x6x24 --speculative ngram@k=4 \
    --out "$RES/issue4-spec-eval.json" 2>&1 | grep -v "it/s" | tail -12
copy "$RES/issue4-spec-eval.json"

if [ -z "${SKIP_TESTS:-}" ]; then
    stamp "pytest -m gpu (speculative path)"
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/speculative/test_draft_model.py tests/speculative/test_verify.py \
        "tests/speculative/test_eagle3.py::test_chain_graph_equals_eager" tests/engine/test_batch_invariance.py \
        tests/kernels/test_paged_attention.py \
        "tests/kernels/test_gemv.py::test_gemv_batch_invariant_rows_qwen_1_5b_shapes" \
        "tests/engine/test_cuda_graph.py::test_graph_verify_equals_eager" 2>&1 | tail -15
fi

stamp "summary"
python3 bench/device/spec_summary.py "$RES/issue4-spec-eval.json"
stamp "done"
