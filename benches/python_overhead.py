"""Decode tokens/s through Python vs through Rust (the `llama` CLI) on the same model, prompt
and token count; prints medians over several alternating rounds and the ratio. A benchmark, not
a test: run it on a quiet machine, with a release wheel (a `maturin build` without --release
keeps debug assertions on in every crate, about 15% slower):

    maturin build --release -m llama-py/Cargo.toml -o target/wheels-release
    pip install --force-reinstall target/wheels-release/*.whl
    cargo build --release -p llama-examples
    python benches/python_overhead.py [MODEL] [--rounds 9] [--tokens 128]
"""
import argparse
import json
import os
import statistics
import subprocess

import llama_core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default=os.path.join(os.path.expanduser("~/.cache/llama-core"), "SmolLM2-135M-Instruct.Q4_1.gguf"))
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--llama", default=os.path.join(ROOT, "target", "release", "llama"))
a = ap.parse_args()
prompt = "Once upon a time"
model = llama_core.Model.load(a.model)
py, rs = [], []
for _ in range(a.rounds):
    with model.session() as s:
        s.generate(prompt, max_tokens=a.tokens, sampler=llama_core.Sampler(temperature=0.0))
        g = s.last_generation
        py.append(1000 * g["generated_tokens"] / g["generation_ms"])
    out = subprocess.run([a.llama, "generate", "--model", a.model, "--prompt", prompt, "--temperature", "0", "--max-tokens", str(a.tokens), "--json"], capture_output=True, text=True, check=True).stdout
    rs.append(json.loads(out)["timings"]["generation_tps"])
mp, mr = statistics.median(py), statistics.median(rs)
print(f"decode tok/s: python {mp:.1f}  rust {mr:.1f}  python/rust {mp / mr:.3f}")
