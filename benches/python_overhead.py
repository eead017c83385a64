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
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default=os.path.join(os.path.expanduser("~/.cache/llama-core"), "SmolLM2-135M-Instruct.Q4_1.gguf"))
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--llama", default=os.path.join(ROOT, "target", "release", "llama"))
a = ap.parse_args()
prompt = "Once upon a time"

# Both sides run the same way each round: a fresh process loads the model and generates once.
# (A long-lived Python process against fresh CLI processes measured the processes, not Python:
# a model just loaded and repacked starts with its weights in the CPU's caches.)
PY_ONE = """
import json, sys, llama_core
model = llama_core.Model.load(sys.argv[1])
with model.session() as s:
    s.generate(sys.argv[2], max_tokens=int(sys.argv[3]), sampler=llama_core.Sampler(temperature=0.0))
    g = s.last_generation
print(json.dumps(1000 * g["generated_tokens"] / g["generation_ms"]))
"""


def python_round():
    out = subprocess.run([sys.executable, "-c", PY_ONE, a.model, prompt, str(a.tokens)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def rust_round():
    out = subprocess.run([a.llama, "generate", "--model", a.model, "--prompt", prompt, "--temperature", "0", "--max-tokens", str(a.tokens), "--json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["timings"]["generation_tps"]


py, rs = [], []
for i in range(a.rounds):
    # Alternate which goes first.
    if i % 2 == 0:
        py.append(python_round())
        rs.append(rust_round())
    else:
        rs.append(rust_round())
        py.append(python_round())
mp, mr = statistics.median(py), statistics.median(rs)
# Each round's pair ran back to back: the median of their ratios shrugs off the machine's
# slower and faster minutes better than the ratio of the medians.
pair = statistics.median(p / r for p, r in zip(py, rs))
print("python rounds:", " ".join(f"{v:.1f}" for v in py))
print("rust rounds:  ", " ".join(f"{v:.1f}" for v in rs))
print(f"decode tok/s: python {mp:.1f}  rust {mr:.1f}  python/rust {mp / mr:.3f} (median of per-round ratios {pair:.3f})")
