#!/usr/bin/env bash
# Builds the llama-core wheel with maturin, installs it into a fresh virtual environment, checks
# the stubs against the module (mypy.stubtest), runs the pytest suite and the Python examples.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(bash scripts/fetch-model.sh)
venv=target/pyvenv
rm -rf "$venv" target/wheels
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "maturin>=1.5,<2" numpy pytest mypy tqdm jsonschema rfc3339-validator openai playwright
"$venv/bin/maturin" build -q -m llama-py/Cargo.toml -o target/wheels
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps target/wheels/llama_core-*.whl
echo "stubtest:"
(cd /tmp && "$OLDPWD/$venv/bin/python" -m mypy.stubtest llama_core._native)
cargo build -q --workspace --all-targets
# The C face of the structured-output tests: examples/c/structured.c against libllama.
prefix=$(bash scripts/build-c.sh)
mkdir -p target/c-tests
cc -std=c11 -Wall -Wextra -Werror examples/c/structured.c -I"$prefix/include" -L"$prefix/lib" -lllama \
  -Wl,-rpath,"$prefix/lib" -o target/c-tests/structured
export LLAMA_TEST_MODEL="$model" LLAMA_BIN="$PWD/target/debug/llama" LLAMA_C_STRUCTURED="$PWD/target/c-tests/structured"
set +e
"$venv/bin/python" -m pytest -q llama-py/tests
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
[ $rc -eq 0 ] || exit $rc
"$venv/bin/python" examples/python/quickstart.py "$model"
"$venv/bin/python" examples/python/notebook.py "$model" > /dev/null
echo "python examples ok"
