#!/usr/bin/env python3
"""Runs `llama bench --json` and benches/llamacpp_bench.py alternately (fresh process each) and
prints the medians of each metric with llama-core/llama.cpp ratios. Called by compare.sh."""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METRICS = [("pp128_tps", "prompt 128 tok/s", True), ("pp512_tps", "prompt 512 tok/s", True),
           ("tg128_tps", "decode tok/s", True), ("ttft_ms", "TTFT ms (128)", False),
           ("peak_rss_mib", "peak RSS MiB", False), ("load_s", "load s", False)]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["default"])
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = ap.parse_args()
    base = subprocess.check_output([args.llama, "fetch-model"], text=True).strip()
    models = []
    for m in args.models:
        if m == "default":
            models.append(base)
        elif m == "all":
            models.append(base)
            cache = os.path.dirname(base)
            for ty in ["f16", "q8_0", "q4_0", "q4_k"]:
                out = os.path.join(cache, f"SmolLM2-135M-Instruct.{ty}.gguf")
                if not os.path.exists(out):
                    subprocess.check_call([args.llama, "quantize", base, out, "--type", ty])
                models.append(out)
        else:
            models.append(m)
    rows = []
    for model in models:
        ours, theirs = [], []
        for r in range(args.rounds):
            for who in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                if who == "ours":
                    cmd = [args.llama, "bench", "--json", "-m", model, "-t", str(args.threads),
                           "-r", str(args.repetitions)]
                else:
                    cmd = [sys.executable, os.path.join(HERE, "llamacpp_bench.py"), "--model", model,
                           "--threads", str(args.threads), "--repetitions", str(args.repetitions)]
                out = subprocess.check_output(cmd, text=True)
                (ours if who == "ours" else theirs).append(json.loads(out.strip().splitlines()[-1]))
                print(f"{os.path.basename(model)} round {r + 1} {who}: "
                      + " ".join(f"{k}={(ours if who == 'ours' else theirs)[-1][k]:.1f}" for k, _, _ in METRICS[:3]),
                      file=sys.stderr)
        med = lambda runs, k: statistics.median(x[k] for x in runs)
        rows.append((os.path.basename(model), {k: (med(ours, k), med(theirs, k)) for k, _, _ in METRICS}))
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, {args.threads} threads; "
             f"{args.rounds} alternating rounds x {args.repetitions} repetitions, medians. "
             "llama.cpp: llama-cpp-python, flash attention on. Ratio: llama-core / llama.cpp "
             "(speed: higher is better; TTFT, RSS, load: lower is better).", ""]
    lines.append("| model | metric | llama-core | llama.cpp | ratio |")
    lines.append("|---|---|---:|---:|---:|")
    for name, vals in rows:
        for k, label, _ in METRICS:
            a, b = vals[k]
            lines.append(f"| {name} | {label} | {a:.1f} | {b:.1f} | {a / b if b else float('nan'):.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        # Into a document between its markers (docs/performance.md), or a file of its own.
        start, end = "<!-- perf:start -->", "<!-- perf:end -->"
        doc = open(args.markdown).read() if os.path.exists(args.markdown) else ""
        if start in doc and end in doc:
            head, rest = doc.split(start, 1)
            text = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
        else:
            text += "\n"
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
