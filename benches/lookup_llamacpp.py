#!/usr/bin/env python3
"""llama.cpp's prompt-lookup decoding (llama-cpp-python's `LlamaPromptLookupDecoding`) on the
copy-heavy chat tasks `llama bench --lookup` runs (the same prompts), against its own plain
decode: greedy, 256 tokens at most, alternating plain and lookup runs, medians. Decode speed
is timed from the first streamed token to the last (the prompt excluded, as `llama bench`
reports generation tok/s). Prints one JSON object: per task the speedup, whether the lookup
output equals the plain one, and both texts (to compare with ours).

  ~/.cache/llama-core/refvenv/bin/python benches/lookup_llamacpp.py --model M.gguf [--threads 2] [--repetitions 3]
"""
import argparse
import json
import statistics
import time

PARAGRAPH = ("The meeting of the river council is planned for Tuesday morning at the old "
             "mill. Every member should bring the notes from the last session, the survey of the "
             "eastern bank, and a list of the repairs that are still waiting. After the meeting, "
             "lunch will be served in the garden, weather permitting, and the afternoon is free for "
             "a walk along the new path to the bridge.")
CODE = ("def moving_average(values, window):\n    if window <= 0:\n        raise ValueError(\"window must be positive\")\n"
        "    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n"
        "        if i >= window:\n            total -= values[i - window]\n        if i >= window - 1:\n"
        "            out.append(total / window)\n    return out\n")
# The tasks of examples/src/bench.rs (`copy_tasks`), word for word.
TASKS = [
    ("rewrite", f"Rewrite this paragraph exactly, changing only Tuesday to Friday:\n\n{PARAGRAPH}"),
    ("code-edit", f"Rename the function to rolling_mean and return the code only:\n\n```python\n{CODE}```"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--num-pred-tokens", type=int, default=10, help="LlamaPromptLookupDecoding's default: 10")
    args = ap.parse_args()
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    def load(lookup):
        draft = LlamaPromptLookupDecoding(num_pred_tokens=args.num_pred_tokens) if lookup else None
        return llama_cpp.Llama(args.model, n_ctx=2048, n_threads=args.threads,
                               n_threads_batch=args.threads, flash_attn=True, verbose=False,
                               draft_model=draft)

    engines = {"plain": load(False), "lookup": load(True)}

    def run(llm, user):
        llm.reset()
        text, stamps = "", []
        for chunk in llm.create_chat_completion(
                messages=[{"role": "user", "content": user}], max_tokens=256, temperature=0.0,
                top_k=1, stream=True, seed=0):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                stamps.append(time.perf_counter())
                text += delta
        n = len(llm.tokenize(text.encode(), add_bos=False, special=False))
        tps = (n - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        return text, tps

    out = []
    for task, user in TASKS:
        tps = {"plain": [], "lookup": []}
        texts = {}
        for r in range(args.repetitions):
            for who in ("plain", "lookup") if r % 2 == 0 else ("lookup", "plain"):
                text, t = run(engines[who], user)
                texts[who] = text
                tps[who].append(t)
        p, g = statistics.median(tps["plain"]), statistics.median(tps["lookup"])
        out.append({"task": task, "plain_tps": p, "lookup_tps": g, "speedup": g / p if p else None,
                    "identical": texts["plain"] == texts["lookup"], "plain_text": texts["plain"],
                    "lookup_text": texts["lookup"]})
    print(json.dumps({"engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__,
                      "model": args.model, "threads": args.threads,
                      "num_pred_tokens": args.num_pred_tokens, "tasks": out}))


if __name__ == "__main__":
    main()
