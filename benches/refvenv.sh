# Sourced by the benchmark scripts: sets VENV to the reference virtual environment
# ($LLAMA_REF_VENV, default ~/.cache/llama-core/refvenv) and installs llama-cpp-python there
# if missing (it compiles llama.cpp: several minutes on 2 cores).
VENV="${LLAMA_REF_VENV:-$HOME/.cache/llama-core/refvenv}"
if ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
    python3 -m venv "$VENV"
    # GGML_NATIVE=ON compiles AMX kernels that fault on these machines (SIGSEGV at the first
    # ldtilecfg on quantized files): the ISA is listed instead, AMX off.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}" "$VENV/bin/pip" install -q "llama-cpp-python==0.3.36" numpy
fi
