# Single entry point. `make demo` streams a chat answer from the default model; `make test`
# runs every check and test (fetches the model first).
.PHONY: demo test lint model reference header c-tests python-tests fuzz miri tsan bench

demo:
	cargo run --release -p llama-examples --bin llama -- chat --prompt "Name three rivers in Europe and one fact about each." --temperature 0.7 --seed 7 --max-tokens 160

model:
	bash scripts/fetch-model.sh >/dev/null

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# include/llama.h must be what cbindgen generates from llama-ffi.
header:
	bash scripts/gen-header.sh --check

c-tests:
	bash tests/c/run.sh

python-tests:
	bash scripts/test-python.sh

# Every check and test (Rust, C, Python) with one feature resolution and one set of portable
# flags for every build, the valgrind run in the background: scripts/test-all.sh.
test:
	bash scripts/test-all.sh

# Benchmarks against llama.cpp (outside CI): kernels and decode (benches/compare.sh), the
# server under concurrent load against llama-cpp-python's server (benches/server.sh), then a
# 5-minute soak of the server under mixed hostile and normal traffic with its RSS curve
# (benches/server_soak.py; docs/reliability.md).
bench:
	bash benches/compare.sh
	bash benches/server.sh
	cargo build --release -q -p llama-examples
	python3 benches/server_soak.py --seconds 300 --csv target/server-soak-rss.csv

# Every fuzz target for FUZZ_SECS seconds each (default 120), exploring past the fixed inputs
# `make test` runs; failures are saved to target/fuzz-failures/.
FUZZ_SECS ?= 120
fuzz:
	LLAMA_FUZZ_SECS=$(FUZZ_SECS) cargo test -p llama-core --test fuzz -- --nocapture
	LLAMA_FUZZ_SECS=$(FUZZ_SECS) cargo test -p llama-server --test fuzz -- --nocapture

# The thread pool's tests under Miri (needs a nightly toolchain with the miri component).
miri:
	MIRIFLAGS="-Zmiri-disable-isolation -Zmiri-ignore-leaks" cargo +nightly miri test -p llama-core --lib pool::

# ThreadSanitizer (nightly with rust-src: the standard library is rebuilt instrumented) on the
# core's unit tests (pool, kernels, attention, sessions), the 8-thread stress test and the pools
# test (skipping one timing assertion the instrumented build is too slow for). The first build
# takes about 5 minutes.
tsan:
	RUSTFLAGS="-Zsanitizer=thread" TSAN_OPTIONS="halt_on_error=1" CARGO_TARGET_DIR=target/tsan \
	  cargo +nightly test -Zbuild-std --target x86_64-unknown-linux-gnu -p llama-core --lib --test stress --test pools \
	  -- --skip hostile_templates_end_with_an_error_quickly

# Regenerates tests/reference/smollm2.json with llama.cpp (slow: builds llama-cpp-python).
reference:
	cargo build --release -p llama-examples
	python3 tests/reference/make_reference.py
	python3 tests/reference/lora_reference.py
	python3 tests/reference/finetune_reference.py
