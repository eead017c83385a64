#!/usr/bin/env bash
# `llama serve` against llama-cpp-python's own server under the same concurrent load
# (benches/server_load.py): aggregate tok/s and TTFT p50/p95 at 1, 4, 8, 16 clients.
#
#   bash benches/server.sh [--model M.gguf] [--concurrency 1,4,8,16] [--requests 2] [--max-tokens 96]
#
# Installs llama-cpp-python (with the AMX-off build flags benches/compare.sh uses) and its
# server's dependencies into $LLAMA_REF_VENV (default ~/.cache/llama-core/refvenv) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/refvenv.sh
"$VENV/bin/python" -c "import llama_cpp.server.app" 2>/dev/null ||
    "$VENV/bin/pip" install -q fastapi uvicorn sse-starlette starlette-context pydantic-settings
cargo build --release -q -p llama-examples
args=("$@")
if ! printf '%s\n' "${args[@]}" | grep -q -- '--model'; then
    args+=(--model "$(bash scripts/fetch-model.sh)")
fi
exec "$VENV/bin/python" benches/server_load.py "${args[@]}"
