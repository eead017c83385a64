#!/usr/bin/env bash
# Regenerates include/llama.h from llama-ffi with the pinned cbindgen (0.29.4).
# `--check` fails if the checked-in header differs.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cbindgen --version 2>/dev/null | grep -q "0.29.4"; then
  cargo install --locked cbindgen@0.29.4 >&2
fi
out=include/llama.h
if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp)
  cbindgen --quiet --config llama-ffi/cbindgen.toml --crate llama-ffi --output "$tmp" llama-ffi
  if ! cmp -s "$tmp" "$out"; then
    diff -u "$out" "$tmp" | head -40 >&2
    echo "include/llama.h is out of date: run scripts/gen-header.sh" >&2
    rm -f "$tmp"
    exit 1
  fi
  rm -f "$tmp"
else
  cbindgen --quiet --config llama-ffi/cbindgen.toml --crate llama-ffi --output "$out" llama-ffi
fi
