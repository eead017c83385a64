#!/usr/bin/env bash
# Builds llama.cpp's own `llama-batched-bench`, `llama-server`, `llama-bench` (-d: decode at a
# context depth) and `llama-perplexity` (benches/kv_quality.py) (outside CI) from the llama.cpp
# that llama-cpp-python's sdist vendors (the version our references use), with the build flags
# of DEVELOPERS.md (GGML_NATIVE off, the ISA listed, AMX off: its native build faults on Intel
# machines with AMX here), and prints the folder holding them.
#
#   bash benches/llamacpp_tools.sh      # into $LLAMA_TOOLS_DIR (default ~/.cache/llama-core/llamacpp-tools)
#
# Then: llama-batched-bench -m M.gguf -npp 32 -ntg 64 -npl 1,4,8,16 -t 2 -fa on (the shape of
# `llama bench --batch`), and benches/server_load.py --servers ours,llama-server. Needs cmake
# (`pip install cmake ninja`), curl and a C++ compiler; about 10 minutes on 2 cores.
set -euo pipefail
VERSION=0.3.36
DIR="${LLAMA_TOOLS_DIR:-$HOME/.cache/llama-core/llamacpp-tools}"
if [ ! -x "$DIR/build/bin/llama-server" ] || [ ! -x "$DIR/build/bin/llama-batched-bench" ] ||
    [ ! -x "$DIR/build/bin/llama-bench" ] || [ ! -x "$DIR/build/bin/llama-perplexity" ]; then
    mkdir -p "$DIR"
    if [ ! -d "$DIR/llama_cpp_python-$VERSION" ]; then
        url=$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ \
            | grep -o "https://[^\"]*llama_cpp_python-$VERSION.tar.gz" | head -1)
        curl -fsSL "$url" | tar xz -C "$DIR"
    fi
    src="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
    cmake -S "$src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
        -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF >&2
    cmake --build "$DIR/build" --target llama-batched-bench llama-server llama-bench llama-perplexity -j "$(nproc)" >&2
fi
echo "$DIR/build/bin"
