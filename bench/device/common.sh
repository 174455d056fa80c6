# Sourced by every device script (bench/device/*.sh): go to the repo root; with
# carried wheels (.whl*/) install them and assemble the GGUFs (setup.sh); then the paths, the
# commit the results record, the results folder, the start time T0, `copy FILE` (to $OUT) and
# `bench NAME TIMEOUT ARGS...` (`lightspeed bench latency ARGS` into $RES/NAME.json, copied).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if ls -d .whl*/ >/dev/null 2>&1 && [ -f bench/device/setup.sh ]; then
    source bench/device/setup.sh
else
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# NOTE: the device machine's copy may carry a stale .git: pass LIGHTSPEED_GIT_COMMIT=<hash> from here
export LIGHTSPEED_GIT_COMMIT=${LIGHTSPEED_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
RES=bench/results
mkdir -p "$RES"
T0=$(date +%s)
copy() { if [ -n "${OUT:-}" ] && [ -f "$1" ]; then cp "$1" "$OUT/"; fi; }
bench() {  # NAME TIMEOUT ARGS...
    local name=$1 limit=$2
    shift 2
    echo "=== $name  [$(( $(date +%s) - T0 )) s]"
    timeout "$limit" python -m lightspeed.cli bench latency "$@" --out "$RES/$name.json" 2>&1 | tail -8
    copy "$RES/$name.json"
}
