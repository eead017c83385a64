#!/usr/bin/env bash
# Builds ik_llama.cpp's llama-bench (the fastest CPU fork of llama.cpp; outside CI) and prints
# its path. benches/compare.sh --ik uses it.
#
#   bash benches/ik_llama.sh            # into $IK_DIR (default ~/.cache/llama-core/ik_llama.cpp)
#
# Pinned to the commit measured in docs/performance.md; IK_COMMIT overrides. Built with
# GGML_NATIVE=ON as its README asks (ik_llama.cpp has no AMX kernels, so native is safe on the
# Intel machines where llama.cpp's native build faults). Needs git, cmake and a C++ compiler
# (`pip install cmake ninja` gives the first two); about 15 minutes on 2 cores.
set -euo pipefail
IK_DIR="${IK_DIR:-$HOME/.cache/llama-core/ik_llama.cpp}"
IK_COMMIT="${IK_COMMIT:-8337e4cd3861406fc04e0854b1409cd1b027fbc9}"
BIN="$IK_DIR/build/bin/llama-bench"
if [ ! -x "$BIN" ]; then
    if [ ! -d "$IK_DIR/.git" ]; then
        git clone --filter=blob:none https://github.com/ikawrakow/ik_llama.cpp "$IK_DIR" >&2
    fi
    git -C "$IK_DIR" checkout -q "$IK_COMMIT"
    cmake -S "$IK_DIR" -B "$IK_DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF >&2
    cmake --build "$IK_DIR/build" --target llama-bench -j "$(nproc)" >&2
fi
echo "$BIN"
