#!/usr/bin/env bash
# Where the HTTP path's time goes at high concurrency: `lightspeed serve --preset max-throughput`
# (its engine process included) and the `bench serve --url` client, each sampled by py-spy
# while the measured level runs, then each process's samples by thread and function
# (stacks.py). Needs the Qwen GGUF (chunks) and the wheels (.whl with the py-spy binary, .whl_server).
#   CONCURRENCY=512 INTERVAL=8 bash bench/device/serve_profile.sh    # raw stacks: $OUT/serve-prof-*.txt
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
MODEL=${MODEL:-qwen2.5-coder-1.5b-instruct} CONCURRENCY=${CONCURRENCY:-512} INTERVAL=${INTERVAL:-8} PORT=${PORT:-8123}
SPY="$(command -v py-spy || echo $PWD/.whl/py-spy) record -r ${RATE:-200} --threads -f raw"
PROF=${OUT:-/tmp}
python -m lightspeed.cli serve --model "$MODEL" --preset max-throughput --stream-interval "$INTERVAL" --port "$PORT" \
    ${SERVER_ARGS:-} > /tmp/serve.log 2>&1 &
SERVER=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
echo "=== server up  [$(( $(date +%s) - T0 )) s]"
client() {  # CONCURRENCY OUTPUT_LEN
    python -m lightspeed.cli bench serve --url "http://127.0.0.1:$PORT" --model "$MODEL" --concurrency "$1" \
        --output-len "$2" --prompts humaneval 2>&1 | tail -2
}
client "${WARM_C:-64}" "${WARM_LEN:-32}"  # graphs, prefill shapes
$SPY --subprocesses --pid $SERVER --duration "${SECONDS_SERVER:-10}" -o "$PROF/serve-prof-server.txt" > /tmp/spy.log 2>&1 &
SPY_SERVER=$!
(sleep "${CLIENT_DELAY:-4}"; $SPY --pid "$(pgrep -f 'bench serve --url' | head -1)" --duration "${SECONDS_CLIENT:-4}" \
    -o "$PROF/serve-prof-client.txt" >/dev/null 2>&1) &
TIMEFORMAT="client: %R s wall, %U s user, %S s sys (the bench client, its start-up included)"
time client "$CONCURRENCY" "${OUTPUT_LEN:-256}"
wait $SPY_SERVER
kill -INT $SERVER
wait $SERVER
python bench/device/stacks.py "$PROF/serve-prof-server.txt" "$PROF/serve-prof-client.txt" --top "${TOP:-25}"
