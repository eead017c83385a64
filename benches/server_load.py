#!/usr/bin/env python3
"""Concurrent load on `llama serve` and on llama-cpp-python's own server (`llama_cpp.server`),
the same requests in the same run on the same machine: aggregate decode tokens/s and time to
first token (p50/p95) at each concurrency.

Each client sends streaming chat requests one after another (its own prompt, end-of-generation
tokens banned through `logit_bias` so that every reply is exactly --max-tokens long on both
servers, checked once with a non-streaming request). Aggregate tokens/s = all generated tokens
/ wall time of the level; TTFT = request sent to first content chunk.

Usage: server_load.py --model M.gguf [--concurrency 1,4,8,16] [--requests 2] [--max-tokens 96]
       [--servers ours,llama-cpp] [--threads N]
`--servers ours,ours-lookup` compares `llama serve` without and with `--lookup` (speculative
decoding from prompt lookup, which backs off while more than 2 sequences decode).
`--servers ours,llama-server` compares llama.cpp's own C++ server (`--parallel` as many slots as
the highest concurrency, continuous batching, flash attention on; $LLAMA_SERVER or
--llama-server PATH: benches/llamacpp_tools.sh builds it from the llama.cpp that
llama-cpp-python's sdist vendors).
Needs the refvenv (llama-cpp-python with its server extras: fastapi, uvicorn, sse-starlette,
starlette-context, pydantic-settings) for llama-cpp; `llama` built in release.
"""

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("LLAMA_REF_VENV", os.path.expanduser("~/.cache/llama-core/refvenv"))

TOPICS = ["the ocean", "mountains", "rivers", "forests", "deserts", "the moon", "volcanoes", "glaciers",
          "rainforests", "islands", "caves", "lakes", "the sun", "comets", "planets", "storms"]


def wait_ready(port, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("server did not start")


def start(kind, model, port, threads, slots, llama_server=None):
    if kind == "llama-server":
        if not llama_server:
            raise SystemExit("--servers llama-server needs --llama-server PATH or $LLAMA_SERVER")
        # Each slot gets n_ctx / parallel positions: 1024 each.
        cmd = [llama_server, "-m", model, "--port", str(port), "--parallel", str(slots),
               "-c", str(1024 * slots), "-fa", "on", "-t", str(threads or os.cpu_count())]
    elif kind.startswith("ours"):
        cmd = [os.path.join(ROOT, "target/release/llama"), "serve", "-m", model, "--port", str(port),
               "--max-sequences", str(slots), "--max-queue", "256"]
        if kind == "ours-lookup":
            cmd.append("--lookup")
        if threads:
            cmd[1:1] = ["--threads", str(threads)]
    else:
        cmd = [os.path.join(VENV, "bin/python"), "-m", "llama_cpp.server", "--model", model,
               "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads or os.cpu_count()),
               # Queue concurrent requests instead of cutting off the running stream (its default).
               "--interrupt_requests", "False"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, proc)
    return proc


def body(i, max_tokens, eog, stream):
    return json.dumps({
        "model": "m",
        "messages": [{"role": "user", "content": f"Write a long essay about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": i,
        "logit_bias": {str(t): -100 for t in eog},
        "stream": stream,
    })


def one(port, i, max_tokens, eog):
    """A streaming request: (time to first content, total time)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body=body(i, max_tokens, eog, True),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    ttft = None
    got = 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("choices") and d["choices"][0].get("delta", {}).get("content"):
            got += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
    c.close()
    assert ttft is not None and got > 0, "a stream without content"
    return ttft, time.perf_counter() - t0


def check_length(port, max_tokens, eog):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", body=body(0, max_tokens, eog, False),
              headers={"Content-Type": "application/json"})
    r = json.loads(c.getresponse().read())
    n = r["usage"]["completion_tokens"]
    assert n == max_tokens, f"expected {max_tokens} tokens, got {n}"


def level(port, conc, requests, max_tokens, eog):
    ttfts, lock = [], threading.Lock()

    def client(k):
        for j in range(requests):
            t, _ = one(port, k * requests + j, max_tokens, eog)
            with lock:
                ttfts.append(t)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(k,)) for k in range(conc)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    total = conc * requests * max_tokens
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [ttfts[0]] * 19
    return total / wall, statistics.median(ttfts), q[18]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--servers", default="ours,llama-cpp")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--eog", default="0,2", help="end-of-generation token ids to ban")
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                    help="llama.cpp's llama-server binary, for --servers llama-server")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    eog = [int(x) for x in a.eog.split(",") if x]
    results = {}
    for n, kind in enumerate(a.servers.split(",")):
        port = 18700 + n
        proc = start(kind, a.model, port, a.threads, max(levels), a.llama_server)
        try:
            check_length(port, a.max_tokens, eog)
            one(port, 99, 8, eog)  # warm-up
            for conc in levels:
                tps, p50, p95 = level(port, conc, a.requests, a.max_tokens, eog)
                results[(kind, conc)] = (tps, p50, p95)
                print(f"{kind:10} concurrency {conc:3}: {tps:8.1f} tok/s aggregate, TTFT p50 {p50 * 1e3:7.0f} ms, p95 {p95 * 1e3:7.0f} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    kinds = a.servers.split(",")
    if "ours" in kinds and "ours-lookup" in kinds:
        print(f"\n{'concurrency':>11} | {'plain':>12} | {'--lookup':>12} | ratio")
        for conc in levels:
            o, l = results[("ours", conc)], results[("ours-lookup", conc)]
            print(f"{conc:>11} | {o[0]:9.1f} t/s | {l[0]:9.1f} t/s | {l[0] / o[0]:4.2f}x")
    for other in ("llama-cpp", "llama-server"):
        if "ours" not in kinds or other not in kinds:
            continue
        print(f"\n{'concurrency':>11} | {'llama serve':>12} | {other:>16} | ratio | TTFT p50/p95 ours | TTFT p50/p95 {other}")
        for conc in levels:
            o, l = results[("ours", conc)], results[(other, conc)]
            print(f"{conc:>11} | {o[0]:9.1f} t/s | {l[0]:13.1f} t/s | {o[0] / l[0]:4.2f}x | {o[1] * 1e3:6.0f}/{o[2] * 1e3:6.0f} ms | {l[1] * 1e3:6.0f}/{l[2] * 1e3:6.0f} ms")


if __name__ == "__main__":
    main()
