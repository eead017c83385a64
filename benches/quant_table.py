#!/usr/bin/env python3
"""Writes docs/quantization.md's table: for the SmolLM2 model in each storage type, file size,
load time, peak RSS, decode tokens/s (`llama bench`) and perplexity (`llama perplexity`, GPL-3,
4 windows of 512). Every file is made by `llama quantize` from an f32 GGUF dequantized from the
shipped Q4_1 file (the original bf16 weights are not available offline), so the higher-precision
rows measure the quantizer and engine, not the original model's quality.

    cargo build --release -p llama-examples
    python3 benches/quant_table.py [--threads 2] [--out docs/quantization.md]
"""
import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ["f32", "f16", "q8_0", "q6_k", "q5_k", "q4_k", "q4_1", "q4_0"]


def run_json(cmd):
    out = subprocess.check_output(cmd, text=True)
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama", default=os.path.join(ROOT, "target", "release", "llama"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--corpus", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "quantization.md"),
                    help="Markdown file whose table between the table markers is replaced")
    args = ap.parse_args()
    shipped = subprocess.check_output([args.llama, "fetch-model"], text=True).strip()
    work = os.path.join(os.path.dirname(shipped), "quant-table")
    os.makedirs(work, exist_ok=True)
    f32 = os.path.join(work, "model.f32.gguf")
    subprocess.check_call([args.llama, "quantize", shipped, f32, "--type", "f32"], stderr=subprocess.DEVNULL)
    rows = []
    for ty in TYPES:
        path = f32 if ty == "f32" else os.path.join(work, f"model.{ty}.gguf")
        if ty != "f32":
            subprocess.check_call([args.llama, "quantize", f32, path, "--type", ty], stderr=subprocess.DEVNULL)
        b = run_json([args.llama, "bench", "--json", "-m", path, "-t", str(args.threads), "-r", "3"])
        p = run_json([args.llama, "perplexity", "--json", "-m", path, "-f", args.corpus,
                      "--chunks", str(args.chunks), "-t", str(args.threads)])
        rows.append((ty, os.path.getsize(path) / 2**20, b, p["perplexity"]))
        print(f"{ty}: {rows[-1][1]:.1f} MiB, tg {b['tg128_tps']:.1f} tok/s, ppl {p['perplexity']:.4f}", file=sys.stderr)
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"Produced by `benches/quant_table.py` on {cpu}, {args.threads} threads. Perplexity: "
        f"{os.path.basename(args.corpus)}, {args.chunks} windows of 512 tokens (llama.cpp's method).",
        "",
        "| type | file MiB | load s | peak RSS MiB | decode tok/s | prompt 512 tok/s | perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ty, size, b, ppl in rows:
        lines.append(f"| {ty} | {size:.1f} | {b['load_s']:.2f} | {b['peak_rss_mib']:.0f} | "
                     f"{b['tg128_tps']:.1f} | {b['pp512_tps']:.1f} | {ppl:.4f} |")
    start, end = "<!-- table:start -->", "<!-- table:end -->"
    doc = open(args.out).read() if os.path.exists(args.out) else f"{start}\n{end}\n"
    if start not in doc or end not in doc:
        sys.exit(f"{args.out} has no {start} ... {end} markers")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(args.out, "w") as f:
        f.write(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
