#!/usr/bin/env bash
# Side-by-side benchmark: llama-core (`llama bench`) against llama.cpp (llama-cpp-python) on the
# same machine, alternating for several rounds; prints medians and ratios.
#
#   bash benches/compare.sh [--rounds N] [--threads N] [--models default|all|PATH...] [--markdown docs/performance.md]
#
# `--models all` also writes f16, q8_0, q4_0 and q4_k GGUF files of the default model (with
# `llama quantize`, into the model cache) and measures each. llama-cpp-python is installed into
# $LLAMA_REF_VENV (default ~/.cache/llama-core/refvenv) if missing: it compiles llama.cpp,
# several minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/refvenv.sh
cargo build --release -q -p llama-examples
exec "$VENV/bin/python" benches/compare.py --llama target/release/llama "$@"
