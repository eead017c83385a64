#!/usr/bin/env bash
# Builds libllama and lays out an install tree: PREFIX/{lib,include,lib/pkgconfig}.
# Usage: scripts/build-c.sh [--release] [PREFIX]   (default PREFIX: target/<profile>/c)
# The tree holds libllama.so.<version> with the libllama.so.<major> SONAME link, libllama.a,
# include/llama.h and lib/pkgconfig/llama-core.pc. Install it to its own prefix: llama.cpp
# ships a libllama.so and llama.h of the same names.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
flags=()
if [ "${1:-}" = "--release" ]; then profile=release; flags=(--release); shift; fi
target="${CARGO_TARGET_DIR:-target}"
prefix="${1:-$target/$profile/c}"
# --workspace resolves features as `cargo test --workspace` does (llama-py's manifest enables
# what the dev-dependencies add), so this and the test build share every compiled library. The
# CLI comes along: the C tests compare with its tokens.
cargo build --workspace --lib --bins "${flags[@]}" >&2
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
major=${version%%.*}
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
prefix=$(cd "$prefix" && pwd)
cp "$target/$profile/libllama.so" "$prefix/lib/libllama.so.$version"
ln -sf "libllama.so.$version" "$prefix/lib/libllama.so.$major"
ln -sf "libllama.so.$major" "$prefix/lib/libllama.so"
cp "$target/$profile/libllama.a" "$prefix/lib/libllama.a"
cp include/llama.h "$prefix/include/llama.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" llama-ffi/llama-core.pc.in > "$prefix/lib/pkgconfig/llama-core.pc"
echo "$prefix"
