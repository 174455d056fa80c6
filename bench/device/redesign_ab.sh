#!/usr/bin/env bash
# Before / after a refactor, in one device call: the batch-1 step of the Qwen2.5-1.5B shape
# (random weights, 1k context; the fused layers on and off) and the HTTP serving curve of the
# default model, and (PARTS=user) batch-1 tokens/s/user of MODEL on HumanEval, with the tree at
# BEFORE_DIR (a `git archive` of the earlier commit, carried) and with this tree.
# JSON: bench/results/$AB-*.json (AB=redesign-ab by default; copied to $OUT).
#   BEFORE_DIR=.before BEFORE_COMMIT=a438ae7 [PARTS=step|serve|user] [AB=name] bash bench/device/redesign_ab.sh
#   SHAPE=tiny-qwen2 CONTEXT_LEN=64 OUTPUT_LEN=8 CONCURRENCY=1,2 EXTRA="--device cpu" bash ...   # CPU smoke
# Needs the default model in $LIGHTSPEED_HOME (no network on the device: carry the GGUF).
set -uo pipefail
source "$(dirname "$0")/common.sh"
BEFORE_DIR=${BEFORE_DIR:-.before} BEFORE_COMMIT=${BEFORE_COMMIT:-before} AB=${AB:-redesign-ab}
MODEL=${MODEL:-smollm2-135m-instruct}
STEP="--shape ${SHAPE:-qwen2.5-1.5b} --context-len ${CONTEXT_LEN:-1024} --output-len ${OUTPUT_LEN:-64} --batch-size 1
      --num-iters 2 --step-tokens 1,4 ${EXTRA:-}"
USER="--model $MODEL --prompts humaneval --batch-size 1 --num-prompts 8 --output-len 256 ${EXTRA:-}"
SERVE="--model $MODEL --concurrency ${CONCURRENCY:-1,16,64} --prompts humaneval --output-len ${OUTPUT_LEN:-128} ${EXTRA:-}"
ab() {  # NAME DIR COMMIT ARGS...: a `lightspeed bench` run in DIR, JSON into this tree's results
    local name=$1 dir=$2 commit=$3
    shift 3
    echo "=== $name  [$(( $(date +%s) - T0 )) s]"
    (cd "$dir" && LIGHTSPEED_GIT_COMMIT=$commit PYTHONPATH="$PWD:${PYTHONPATH#*:}" timeout 240 \
        python -m lightspeed.cli bench "$@" --out "$OLDPWD/$RES/$name.json" 2>&1 | tail -6)
    copy "$RES/$name.json"
}
PARTS=${PARTS:-step,serve}
if [[ $PARTS == *step* ]]; then
    ab $AB-step-before "$BEFORE_DIR" "$BEFORE_COMMIT" latency $STEP
    ab $AB-step-after-unfused . "$LIGHTSPEED_GIT_COMMIT" latency $STEP --no-fused-layers
    ab $AB-step-after . "$LIGHTSPEED_GIT_COMMIT" latency $STEP
fi
if [[ $PARTS == *serve* ]]; then
    ab $AB-serve-before "$BEFORE_DIR" "$BEFORE_COMMIT" serve $SERVE
    ab $AB-serve-after . "$LIGHTSPEED_GIT_COMMIT" serve $SERVE
fi
if [[ $PARTS == *user* ]]; then  # twice each, alternating: the spread between runs is the noise
    for i in 1 2; do
        ab $AB-user-before-$i "$BEFORE_DIR" "$BEFORE_COMMIT" latency $USER
        ab $AB-user-after-$i . "$LIGHTSPEED_GIT_COMMIT" latency $USER
    done
fi
echo "=== summary  [$(( $(date +%s) - T0 )) s]"
python - "$RES" "$AB" <<'PY'
import json, sys
from pathlib import Path
for p in sorted(Path(sys.argv[1]).glob(f"{sys.argv[2]}-*.json")):
    for r in json.loads(p.read_text())["results"]:
        ms, tps, user = r.get("ms_per_step"), r.get("tokens_per_s_server"), r.get("tokens_per_s_user")
        print(f"{p.stem[len(sys.argv[2]) + 1:]:<18} {r['name'][:58]:<58} " + (f"{ms:7.3f} ms" if ms else "") +
              (f"  {tps:9.1f} tok/s/server" if tps and not ms else "") + (f"  {user:7.1f} tok/s/user" if user else ""))
PY
