"""Quickstart: load the model, stream a chat answer, print tokens/s.

    python examples/python/quickstart.py [MODEL]      (default: the cached SmolLM2 model)
"""
import os
import sys

import llama_core

cache = os.environ.get("LLAMA_CORE_CACHE", os.path.expanduser("~/.cache/llama-core"))
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")

model = llama_core.Model.load(path, progress=True)
print(model)

sampler = llama_core.Sampler(temperature=0.7, seed=7)
with model.session() as session:
    messages = [{"role": "user", "content": "Name three rivers in Europe."}]
    for piece in session.chat_stream(messages, max_tokens=64, sampler=sampler):
        print(piece, end="", flush=True)
    print()
    g = session.last_generation
    tps = 1000 * g["generated_tokens"] / max(g["generation_ms"], 1e-9)
    print(f"[{g['generated_tokens']} tokens, {tps:.1f} tok/s, stop: {g['stop_reason']}]", file=sys.stderr)
