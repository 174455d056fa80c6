#!/usr/bin/env bash
# Issue 16 on the GPU: structured outputs' grammar compile time, per-token overhead of a JSON
# schema at batch 1 and 64, and speculation's speedup under a JSON schema vs unconstrained
# (0.5B draft model, then n-gram), Qwen2.5-Coder-1.5B target; then where the draft model's
# speculative step spends its host time, unconstrained vs the schema (structured_spec_profile.py).
# Results: bench/results/structured-*.json.
# Needs xgrammar and jsonschema (+ deps): carry .whl_structured/ and .whl_server/ (pydantic; setup.sh installs them).
# CPU smoke: MODEL=smollm2-135m-instruct DRAFT=ngram MAX_TOKENS=8 BATCH_SIZES=1,2 NUM_PROMPTS=2 DEVICE=cpu \
#            bash bench/device/structured.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
MODEL=${MODEL:-qwen2.5-coder-1.5b-instruct}
DRAFT=${DRAFT:-draft:qwen2.5-coder-0.5b-instruct}
MAX_TOKENS=${MAX_TOKENS:-128}
BATCH_SIZES=${BATCH_SIZES:-1,64}
NUM_PROMPTS=${NUM_PROMPTS:-8}
DEV=${DEVICE:+--device $DEVICE}
run() {  # NAME SPEC BATCH_SIZES
    echo "=== structured-$1  [$(( $(date +%s) - T0 )) s]"
    timeout 420 python -m lightspeed.cli bench structured --model "$MODEL" $DEV --speculative "$2" \
        --num-speculative-tokens 4 --batch-sizes "$3" --max-tokens "$MAX_TOKENS" --num-prompts "$NUM_PROMPTS" \
        --out "$RES/structured-$1.json" 2>&1 | grep -v "Warning: GrammarMatcher" | tail -14
    copy "$RES/structured-$1.json"
}
run "${DRAFT%%:*}" "$DRAFT" "$BATCH_SIZES"
[ "$DRAFT" != ngram ] && run ngram ngram ""
if [[ $DRAFT == draft:* ]]; then
    echo "=== profile  [$(( $(date +%s) - T0 )) s]"
    timeout 200 python bench/device/structured_spec_profile.py "$MODEL" "${DRAFT#draft:}" \
        "$RES/structured-spec-profile-draft.json" "$NUM_PROMPTS" "$MAX_TOKENS" 2>&1 | grep -v "Warning: GrammarMatcher"
    copy "$RES/structured-spec-profile-draft.json"
fi
echo "=== done [$(( $(date +%s) - T0 )) s]"
