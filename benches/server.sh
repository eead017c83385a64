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
VENV="${LLAMA_REF_VENV:-$HOME/.cache/llama-core/refvenv}"
if ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
    python3 -m venv "$VENV"
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}" "$VENV/bin/pip" install -q "llama-cpp-python==0.3.36" numpy
fi
"$VENV/bin/python" -c "import llama_cpp.server.app" 2>/dev/null ||
    "$VENV/bin/pip" install -q fastapi uvicorn sse-starlette starlette-context pydantic-settings
cargo build --release -q -p llama-examples
args=("$@")
if ! printf '%s\n' "${args[@]}" | grep -q -- '--model'; then
    args+=(--model "$(bash scripts/fetch-model.sh)")
fi
exec "$VENV/bin/python" benches/server_load.py "${args[@]}"
