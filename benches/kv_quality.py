#!/usr/bin/env python3
"""Perplexity of a long text with each KV cache type, ours against llama.cpp's on the same file.

Ours: `llama perplexity --kv-type T`; llama.cpp: its `llama-perplexity` (built from the
llama.cpp that llama-cpp-python 0.3.36 vendors by benches/llamacpp_tools.sh, which also builds
this tool) with `-ctk T -ctv T -fa on`, its defaults otherwise (a quantized cache is
Hadamard-rotated there since its PR 21038). Both score the second half of windows of --ctx
tokens (llama.cpp's method). The text: the licence texts in /usr/share/common-licenses joined
(about 60K tokens; no network here).

Usage: python3 benches/kv_quality.py [--model GGUF] [--ctx 2048] [--chunks 8]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

TEXTS = ["GPL-3", "GPL-2", "GFDL-1.3", "LGPL-2.1", "MPL-2.0", "Apache-2.0", "MPL-1.1", "GPL-1", "LGPL-2"]


def corpus() -> str:
    parts = []
    for name in TEXTS:
        p = os.path.join("/usr/share/common-licenses", name)
        if os.path.exists(p):
            parts.append(open(p, encoding="utf-8", errors="replace").read())
    if not parts:
        sys.exit("no licence texts in /usr/share/common-licenses")
    f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    f.write("\n\n".join(parts))
    f.close()
    return f.name


def ours(llama, model, text, ctx, chunks, kv):
    out = subprocess.check_output(
        [llama, "perplexity", "--json", "-m", model, "-f", text, "--n-ctx", str(ctx),
         "--chunks", str(chunks), "--kv-type", kv], text=True)
    return json.loads(out)["perplexity"]


def theirs(tool, model, text, ctx, chunks, kv, threads):
    out = subprocess.run(
        [tool, "-m", model, "-f", text, "-c", str(ctx), "--chunks", str(chunks), "-ctk", kv,
         "-ctv", kv, "-fa", "on", "-t", str(threads), "-b", str(ctx)],
        capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if not m:
        sys.exit(f"llama-perplexity failed:\n{out.stderr[-2000:]}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/llama-core/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--llama", default="target/release/llama")
    ap.add_argument("--llama-perplexity", default=os.path.expanduser(
        "~/.cache/llama-core/llamacpp-tools/build/bin/llama-perplexity"),
        help="built by benches/llamacpp_tools.sh")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    args = ap.parse_args()
    text = corpus()
    rows = []
    for kv in args.types.split(","):
        a = ours(args.llama, args.model, text, args.ctx, args.chunks, kv)
        b = theirs(args.llama_perplexity, args.model, text, args.ctx, args.chunks, kv, args.threads)
        rows.append((kv, a, b))
        print(f"{kv}: llama-core {a:.4f}, llama.cpp {b:.4f}", file=sys.stderr)
    base_a, base_b = rows[0][1], rows[0][2]
    print(f"Perplexity, {os.path.basename(args.model)}, licence texts, {args.chunks} windows of {args.ctx} tokens:\n")
    print("| cache | llama-core | vs its f16 | llama.cpp (-fa on) | vs its f16 |")
    print("|---|---:|---:|---:|---:|")
    for kv, a, b in rows:
        print(f"| {kv} | {a:.4f} | {100 * (a / base_a - 1):+.2f}% | {b:.4f} | {100 * (b / base_b - 1):+.2f}% |")
    os.unlink(text)


if __name__ == "__main__":
    main()
