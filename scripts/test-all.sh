#!/usr/bin/env bash
# `make test`: every check and test (Rust, C, Python), arranged so that on a 2-core machine
# each crate compiles once and no core sits idle:
#   - one feature resolution (`--workspace`) and one set of flags for every cargo build, so the
#     kernel-path reruns reuse the test binaries, and the C suite, the CLI tests and the wheel's
#     helpers share the debug build;
#   - portable code (x86-64-v3: no compiler-emitted AVX-512; the kernels still pick AVX-512 at
#     run time), so valgrind checks the library just built with no second build;
#   - the valgrind run (single-threaded, minutes) in the background while the rest runs.
# Its log is printed at the end; any failure fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="-C target-cpu=x86-64-v3"
t0=$(date +%s)
step() { echo "== $* ($(($(date +%s) - t0)) s)"; }

step "model"
bash scripts/fetch-model.sh >/dev/null
step "format and header"
cargo fmt --all -- --check
bash scripts/gen-header.sh --check
step "build the libraries and programs (workspace)"
# The valgrind run is the longest job: it starts as soon as libllama and the CLI exist. Its
# features are the test build's (llama-py's manifest enables what the dev-dependencies add), so
# the test build below reuses every library compiled here.
prefix=$(bash scripts/build-c.sh)

step "C suite under valgrind (background)"
mkdir -p target
vg_log=target/valgrind-suite.log
LLAMA_C_PREFIX=$prefix bash tests/c/run.sh --valgrind >"$vg_log" 2>&1 &
vg_pid=$!
# Stop the background run if this script fails or is interrupted.
trap 'kill "$vg_pid" 2>/dev/null || true' EXIT

step "build the tests"
cargo test --workspace --no-run

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "Rust tests"
cargo test --workspace
step "kernel and attention unit tests on each narrower SIMD path (same binaries)"
LLAMA_CORE_KERNEL=vnni256 cargo test --workspace --lib
LLAMA_CORE_KERNEL=avx2 cargo test --workspace --lib
LLAMA_CORE_KERNEL=scalar cargo test --workspace --lib
step "candle's tensor path on every weight format and tiny architecture"
LLAMA_CORE_KERNEL=candle cargo test --workspace --lib --test formats --test tiny_models --test lora
step "C suite"
bash tests/c/run.sh --native
step "Python"
bash scripts/test-python.sh

step "waiting for the valgrind run"
set +e
wait "$vg_pid"
vg_rc=$?
set -e
trap - EXIT
cat "$vg_log"
if [ "$vg_rc" -ne 0 ]; then
  echo "the C suite under valgrind failed (exit $vg_rc)" >&2
  exit "$vg_rc"
fi
step "all tests passed"
