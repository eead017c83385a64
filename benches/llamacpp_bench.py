#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) measured exactly as `llama bench` measures llama-core:
the same synthetic token ids, fresh context per run, median of repetitions. Prints one JSON
object with the same fields."""
import argparse
import json
import resource
import statistics
import sys
import time


def bench_tokens(n, vocab):
    span = max(vocab - 200, 1)
    return [100 + (i * 2654435761) % span for i in range(n)]


def rss_now_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--flash-attn", type=int, default=1)
    ap.add_argument("--lora", default=None, help="a GGUF LoRA file applied at scale 1")
    args = ap.parse_args()
    import numpy as np
    import llama_cpp

    base = rss_now_mib()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(args.model, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=bool(args.flash_attn), verbose=False,
                          lora_path=args.lora)
    load_s = time.perf_counter() - t0
    toks = bench_tokens(512, llm.n_vocab())
    llm.reset()
    llm.eval(toks[:16])

    def last_argmax():
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def pp(n):
        secs = []
        for _ in range(args.repetitions):
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
            t = time.perf_counter()
            llm.eval(toks[:n])
            last_argmax()
            secs.append(time.perf_counter() - t)
        m = statistics.median(secs)
        return n / m, m * 1000

    pp128, ttft_ms = pp(128)
    pp512, _ = pp(512)
    tg = []
    for _ in range(args.repetitions):
        llm.reset()
        llm.eval(toks[:8])
        nxt = last_argmax()
        t = time.perf_counter()
        for _ in range(128):
            llm.eval([nxt])
            nxt = last_argmax()
        tg.append(128 / (time.perf_counter() - t))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "engine": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "model": args.model,
        "threads": args.threads,
        "flash_attn": bool(args.flash_attn),
        "lora": args.lora,
        "repetitions": args.repetitions,
        "pp128_tps": pp128,
        "pp512_tps": pp512,
        "tg128_tps": statistics.median(tg),
        "ttft_ms": ttft_ms,
        # The interpreter's own memory (measured before loading) is left out.
        "peak_rss_mib": peak - base,
        "process_peak_rss_mib": peak,
        "load_s": load_s,
    }))


if __name__ == "__main__":
    sys.exit(main())
