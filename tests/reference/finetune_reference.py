#!/usr/bin/env python3
"""A fine-tuned adapter through llama.cpp: trains a LoRA adapter with `llama finetune` on a
made-up date notation (SmolLM2-135M-Instruct Q4_1, QLoRA), then answers held-out prompts
greedily with this library (`llama generate --lora`, the PEFT folder and adapter.gguf) and with
llama.cpp (llama-cpp-python 0.3.36, `lora_path=adapter.gguf`), and prints the exact-match
counts and where the two engines' answers differ.

Usage: python3 tests/reference/finetune_reference.py [--model PATH] [--llama target/release/llama]
Not run by CI (it trains for ~2 minutes); `make reference` runs it.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from make_reference import ensure_venv  # noqa: E402


def example(r):
    y, m, d = r.randint(1950, 2049), r.randint(1, 12), r.randint(1, 28)
    return f"Rewrite the date {y:04d}-{m:02d}-{d:02d} in star notation:", f" {d:02d}*{m:02d}*{y:04d}*"


def main():
    ensure_venv()
    import llama_cpp

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--llama", default=os.path.join(ROOT, "target", "release", "llama"))
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    model = args.model or subprocess.check_output(["bash", os.path.join(ROOT, "scripts", "fetch-model.sh")], text=True).strip()
    r = random.Random(1)
    train = [example(r) for _ in range(400)]
    held = [example(r) for _ in range(20)]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "train.jsonl")
        with open(data, "w") as f:
            for p, c in train:
                f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
        out = os.path.join(tmp, "out")
        subprocess.check_call([args.llama, "finetune", "-m", model, "--data", data, "-o", out,
                               "--max-steps", str(args.steps), "--rank", "8", "--lr", "1e-3"])

        def ours(lora, prompt):
            cmd = [args.llama, "generate", "-m", model, "-p", prompt, "--temperature", "0", "-n", "16", "--json"]
            if lora:
                cmd += ["--lora", lora]
            return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)["text"]

        llm = llama_cpp.Llama(model, n_ctx=256, verbose=False, n_threads=2, lora_path=os.path.join(out, "adapter.gguf"))
        counts = {"base": 0, "peft": 0, "gguf": 0, "llama.cpp": 0}
        differ = []
        for p, want in held:
            answers = {
                "base": ours(None, p),
                "peft": ours(out, p),
                "gguf": ours(os.path.join(out, "adapter.gguf"), p),
                "llama.cpp": llm.create_completion(p, max_tokens=16, temperature=0.0)["choices"][0]["text"],
            }
            for k, v in answers.items():
                counts[k] += v.startswith(want)
            if answers["gguf"][: len(want)] != answers["llama.cpp"][: len(want)]:
                differ.append((p, answers["gguf"], answers["llama.cpp"]))
        print(json.dumps({"held_out": len(held), "exact_match": counts, "engines_differ": differ}, indent=1))


if __name__ == "__main__":
    main()
