#!/usr/bin/env bash
# Side-by-side benchmark: llama-core (`llama bench`) against llama.cpp (llama-cpp-python) on the
# same machine, alternating for several rounds; prints medians and ratios.
#
#   bash benches/compare.sh [--rounds N] [--threads N] [--models default|all|1b|PATH...]
#        [--ik] [--engines ours,llamacpp,ik,ik-rtr] [--bandwidth] [--markdown docs/performance.md]
#
# `--models all` also writes f16, q8_0, q4_0 and q4_k GGUF files of the default model (with
# `llama quantize`, into the model cache) and measures each; `--models 1b` writes a random-weight
# model of Llama 3.2 1B's shape in every common type (f16, q8_0, q6_k, q5_k, q5_k_m, q5_1, q5_0,
# q4_k, q4_k_m, q4_1, q4_0; benches/make_1b.py, llama.cpp's own quantizer) and measures each.
# `--ik` adds ik_llama.cpp without and with -rtr (benches/ik_llama.sh builds its llama-bench); `--bandwidth` adds each
# decode's GB/s against the streaming read bandwidth measured in the same run. llama-cpp-python
# is installed into $LLAMA_REF_VENV (default ~/.cache/llama-core/refvenv) if missing: it compiles
# llama.cpp, several minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/refvenv.sh
cargo build --release -q -p llama-examples
"$VENV/bin/pip" install -q gguf
args=()
for a in "$@"; do
    if [ "$a" = "--ik" ]; then
        args+=(--ik "$(bash benches/ik_llama.sh)")
    else
        args+=("$a")
    fi
done
exec "$VENV/bin/python" benches/compare.py --llama target/release/llama "${args[@]}"
