#!/usr/bin/env python3
"""Runs `llama bench --json` beside llama.cpp (benches/llamacpp_bench.py, through
llama-cpp-python) and ik_llama.cpp (its own llama-bench), alternating engines round by round
(a fresh process each), and prints the medians of each metric with llama-core/other ratios.
With `--bandwidth`, each decode's GB/s (the weight bytes a decode step reads in the file's
format, times tokens per second) against the streaming read bandwidth `llama bench` measures
in the same run. Called by compare.sh."""
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
NAMES = {"ours": "llama-core", "llamacpp": "llama.cpp", "ik": "ik_llama.cpp",
         "ik-rtr": "ik_llama.cpp -rtr"}
# The 1B-shape sweep (`--models 1b`): every common GGUF type, written by make_1b.py.
SWEEP_1B = ["f16", "q8_0", "q6_k", "q5_k", "q5_k_m", "q5_1", "q5_0", "q4_k", "q4_k_m", "q4_1",
            "q4_0"]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def file_decode_bytes(path):
    """Bytes of the matrices one decode step reads, as the file stores them: every layer's
    and the output head (the token embedding when it is the tied head)."""
    import gguf

    r = gguf.GGUFReader(path)
    names = {t.name for t in r.tensors}
    total = 0
    for t in r.tensors:
        if len(t.shape) < 2:
            continue
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes)
    return total


def ik_bench(args, model, rtr):
    """ik_llama.cpp's llama-bench on the same tests (prompts of 128 and 512, 128 decoded),
    flash attention on, with run-time repacking (`-rtr 1`: its interleaved-row layouts) or
    without."""
    cmd = [args.ik, "-m", model, "-t", str(args.threads), "-p", "128,512", "-n", "128",
           "-r", str(args.repetitions), "-fa", "1", "-o", "json"]
    if rtr:
        cmd += ["-rtr", "1"]
    out = subprocess.check_output(cmd, text=True, stderr=subprocess.DEVNULL)
    res = {}
    for run in json.loads(out[out.index("["):]):
        if run.get("n_gen", 0) > 0:
            res["tg128_tps"] = run["avg_ts"]
        else:
            res[f"pp{run['n_prompt']}_tps"] = run["avg_ts"]
    return res


def run_engine(args, who, model):
    if who == "ours":
        cmd = [args.llama, "bench", "--json", "-m", model, "-t", str(args.threads),
               "-r", str(args.repetitions)]
        if args.bandwidth:
            cmd.append("--bandwidth")
    elif who == "llamacpp":
        cmd = [sys.executable, os.path.join(HERE, "llamacpp_bench.py"), "--model", model,
               "--threads", str(args.threads), "--repetitions", str(args.repetitions)]
    else:
        return ik_bench(args, model, who == "ik-rtr")
    out = subprocess.check_output(cmd, text=True)
    return json.loads(out.strip().splitlines()[-1])


def models_for(args):
    base = subprocess.check_output([args.llama, "fetch-model"], text=True).strip()
    cache = os.path.dirname(base)
    models = []
    for m in args.models:
        if m == "default":
            models.append(base)
        elif m == "all":
            models.append(base)
            for ty in ["f16", "q8_0", "q4_0", "q4_k"]:
                out = os.path.join(cache, f"SmolLM2-135M-Instruct.{ty}.gguf")
                if not os.path.exists(out):
                    subprocess.check_call([args.llama, "quantize", base, out, "--type", ty])
                models.append(out)
        elif m == "1b":
            d = os.path.join(cache, "1b")
            os.makedirs(d, exist_ok=True)
            f16 = os.path.join(d, "f16.gguf")
            make = [sys.executable, os.path.join(HERE, "make_1b.py")]
            if not os.path.exists(f16):
                subprocess.check_call(make + [f16, "f16"])
            for ty in SWEEP_1B:
                out = os.path.join(d, f"{ty}.gguf")
                if not os.path.exists(out):
                    subprocess.check_call(make + [out, ty, "--from", f16])
                models.append(out)
        else:
            models.append(m)
    return models


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["default"],
                    help="default, all (SmolLM2 in several types), 1b (the 1B-shape sweep) or paths")
    ap.add_argument("--engines", default=None,
                    help="comma-separated: ours, llamacpp, ik, ik-rtr (ik_llama.cpp with run-time "
                    "repacking); default: ours,llamacpp, and ik,ik-rtr with --ik")
    ap.add_argument("--ik", help="ik_llama.cpp's llama-bench (benches/ik_llama.sh builds it)")
    ap.add_argument("--bandwidth", action="store_true",
                    help="decode GB/s against the streaming read bandwidth measured in each of our runs")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = ap.parse_args()
    engines = (args.engines.split(",") if args.engines
               else ["ours", "llamacpp"] + (["ik", "ik-rtr"] if args.ik else []))
    if any(e.startswith("ik") for e in engines) and not args.ik:
        sys.exit("--engines ik needs --ik PATH (benches/ik_llama.sh builds it)")
    others = [e for e in engines if e != "ours"]
    rows = []
    for model in models_for(args):
        runs = {e: [] for e in engines}
        for r in range(args.rounds):
            order = engines if r % 2 == 0 else engines[::-1]
            for who in order:
                res = run_engine(args, who, model)
                runs[who].append(res)
                print(f"{os.path.basename(model)} round {r + 1} {who}: "
                      + " ".join(f"{k}={res[k]:.1f}" for k, _, _ in METRICS[:3] if k in res),
                      file=sys.stderr)
        vals = {}
        for who in engines:
            for k, _, _ in METRICS:
                got = [x[k] for x in runs[who] if x.get(k) is not None]
                vals[(who, k)] = statistics.median(got) if got else None
        if args.bandwidth and "ours" in engines:
            bw = statistics.median(x["read_gbps"] for x in runs["ours"])
            nbytes = file_decode_bytes(model)
            vals["read_gbps"] = bw
            vals["decode_mb"] = nbytes / 1e6
            for who in engines:
                tg = vals[(who, "tg128_tps")]
                vals[(who, "gbps")] = nbytes * tg / 1e9 if tg else None
        rows.append((os.path.basename(model), vals))
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}"
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, {args.threads} threads; "
             f"{args.rounds} alternating rounds x {args.repetitions} repetitions, medians. "
             "llama.cpp: llama-cpp-python, flash attention on; ik_llama.cpp: its llama-bench, "
             "flash attention on, without and with run-time repacking (-rtr 1). "
             "Ratio: llama-core / the other "
             "(speed: higher is better; TTFT, RSS, load: lower is better).", ""]
    head = ["model", "metric"] + [NAMES[e] for e in engines] + [f"vs {NAMES[e]}" for e in others]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|---|" + "---:|" * (len(head) - 2))
    for name, vals in rows:
        for k, label, _ in METRICS:
            vs = [vals[(e, k)] for e in engines]
            if all(v is None for v in vs[1:]) and others:
                continue
            ours = vals.get(("ours", k))
            cells = [fmt(v) for v in vs] + [ratio(ours, vals[(e, k)]) for e in others]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
        if "read_gbps" in vals:
            bw = vals["read_gbps"]
            cells = [f"{fmt(vals[(e, 'gbps')])} ({100 * vals[(e, 'gbps')] / bw:.0f}%)"
                     if vals[(e, "gbps")] else "-" for e in engines]
            lines.append(f"| {name} | decode GB/s ({vals['decode_mb']:.0f} MB a token; "
                         f"read {bw:.1f} GB/s) | " + " | ".join(cells)
                         + " |" + " |" * len(others))
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
