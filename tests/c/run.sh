#!/usr/bin/env bash
# Builds and runs the C example and the C test suite against libllama (debug build), checks
# the library's export list and that the header compiles as C++ and survives double inclusion,
# then runs the suite under valgrind on a portable (x86-64-v3) build, since valgrind cannot
# decode AVX-512 (the build just made when RUSTFLAGS is already portable, as under `make test`).
#
# Usage: tests/c/run.sh [--native | --valgrind]   (default: both, native first)
# `make test` starts `--valgrind` in the background (valgrind keeps one core busy for minutes)
# and runs `--native` with the other tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-all}
case "$mode" in all | --native | --valgrind) ;; *)
  echo "usage: $0 [--native | --valgrind]" >&2
  exit 2
  ;;
esac
# Code valgrind decodes (no AVX-512 instructions emitted by the compiler; the kernels' run-time
# detection sees no AVX-512 under valgrind either). The Makefile's test target builds with it.
PORTABLE_RUSTFLAGS="-C target-cpu=x86-64-v3"
model=$(bash scripts/fetch-model.sh)
# LLAMA_C_PREFIX: an install tree scripts/build-c.sh already laid out (no cargo call here, so a
# background run does not wait on cargo's lock while the tests build).
prefix=${LLAMA_C_PREFIX:-$(bash scripts/build-c.sh)}
# Each mode has its own output folder: the two may run at the same time.
out=target/c-tests/${mode#--}
mkdir -p "$out"
CFLAGS=(-std=c11 -Wall -Wextra -Werror -pedantic)
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
if command -v pkg-config >/dev/null; then
  pc_flags=$(pkg-config --cflags --libs llama-core)
else
  pc_flags="-I$prefix/include -L$prefix/lib -lllama"
fi
cc "${CFLAGS[@]}" -pthread tests/c/test_api.c $pc_flags -lm -o "$out/test_api"
# The tokens the Rust API produces for the same prompt, greedy (the CLI is built by build-c.sh:
# it builds the workspace's every target).
ids=$(target/debug/llama generate --model "$model" --prompt "1, 2, 3, 4, 5," --temperature 0 --max-tokens 12 --json 2>/dev/null |
  python3 -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["ids"])))')

if [ "$mode" != --valgrind ]; then
  # The shared library exports the `llama_*` API and nothing else (no dependency's C symbols,
  # such as llguidance's `llg_*`, which would clash with a host linking that library itself).
  exports=$(nm -D --defined-only "$prefix/lib/libllama.so" | awk '{print $3}')
  others=$(printf '%s\n' "$exports" | grep -v '^llama_' || true)
  if [ -n "$others" ] || ! printf '%s\n' "$exports" | grep -q '^llama_model_load'; then
    echo "libllama.so must export only llama_* symbols; it also exports:" >&2
    printf '%s\n' "$others" | head -20 >&2
    exit 1
  fi
  echo "libllama.so exports $(printf '%s\n' "$exports" | wc -l) symbols, all llama_*"
  # Header: C, C++, double inclusion.
  printf '#include "llama.h"\n#include "llama.h"\nint main(void){ return LLAMA_VERSION_NUMBER > 0 ? 0 : 1; }\n' > "$out/double.c"
  cc "${CFLAGS[@]}" -I"$prefix/include" -c "$out/double.c" -o "$out/double.o"
  c++ -std=c++17 -Wall -Wextra -Werror -x c++ -I"$prefix/include" -c "$out/double.c" -o "$out/double_cpp.o"
  # Examples.
  cc "${CFLAGS[@]}" examples/c/chat.c $pc_flags -o "$out/chat"
  cc "${CFLAGS[@]}" examples/c/structured.c $pc_flags -o "$out/structured"
  export LD_LIBRARY_PATH="$prefix/lib"
  echo "C test suite (expected greedy ids from Rust: $ids)"
  "$out/test_api" "$model" "$ids"
  "$out/chat" "$model" "Say hello." > "$out/chat.out"
  test -s "$out/chat.out"
  echo "yes
no" | "$out/structured" "$model" choices "Is fire hot?" > "$out/structured.out"
  grep -qx 'yes\|no' "$out/structured.out"
fi

if [ "$mode" != --native ]; then
  if ! command -v valgrind >/dev/null; then
    echo "valgrind not installed: the memory check cannot run" >&2
    exit 1
  fi
  mkdir -p "$out/vg"
  if [ "${RUSTFLAGS:-}" = "$PORTABLE_RUSTFLAGS" ]; then
    # `make test` builds everything portable: the library just built is the one to check.
    cp "$prefix/lib/libllama.so" "$out/vg/libllama.so.0"
  else
    vg_target=target/valgrind
    CARGO_TARGET_DIR=$vg_target RUSTFLAGS="$PORTABLE_RUSTFLAGS" cargo build -q -p llama-ffi >&2
    cp "$vg_target/debug/libllama.so" "$out/vg/libllama.so.0"
  fi
  echo "C test suite under valgrind"
  # valgrind's report goes to a file, printed last on failure (its first error, with its kind,
  # would otherwise scroll out of a CI log's tail behind the stacks).
  vg_log="$out/valgrind.log"
  if ! LLAMA_TEST_LIGHT=1 LD_LIBRARY_PATH="$out/vg" valgrind --error-exitcode=1 --log-file="$vg_log" \
    --suppressions=tests/c/valgrind.supp --leak-check=full --errors-for-leak-kinds=definite \
    --show-leak-kinds=definite -q "$out/test_api" "$model" "$ids"; then
    echo "valgrind reported errors (or the suite failed under it); its report, first 80 lines:" >&2
    head -n 80 "$vg_log" >&2
    exit 1
  fi
fi
