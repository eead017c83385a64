#!/usr/bin/env python3
"""Soak: one model, sessions made, used (generate, fork, save/restore, truncate, chat) and
dropped over and over for a while; resident memory (VmRSS) is sampled as it goes and must stay
flat once warm.

Usage: python3 benches/soak.py [--model PATH] [--minutes 10] [--threads 2]
Needs the llama_core wheel (scripts/test-python.sh installs it into target/pyvenv:
target/pyvenv/bin/python benches/soak.py).
"""
import argparse
import os
import sys
import threading
import time

import llama_core


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def work(model, seed, stop, counts, i):
    sampler = llama_core.Sampler(temperature=0.8, seed=seed)
    while not stop.is_set():
        with model.session(n_ctx=512) as s:
            s.generate("Once upon a time", max_tokens=48, sampler=sampler)
            f = s.fork()
            f.generate(" Then", max_tokens=16, sampler=sampler)
            blob = s.save_state(sampler)
            r, _ = llama_core.Session.restore(model, blob)
            r.generate(" And", max_tokens=16, sampler=sampler)
            s.truncate(max(1, len(s) - 8))
            s.chat([{"role": "user", "content": "Say hi."}], max_tokens=16, sampler=sampler)
            f.close()
            r.close()
        counts[i] += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.environ.get("LLAMA_TEST_MODEL"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.model:
        sys.exit("--model (or LLAMA_TEST_MODEL) is required")
    model = llama_core.Model.load(args.model)
    stop = threading.Event()
    counts = [0] * args.threads
    workers = [
        threading.Thread(target=work, args=(model, 7 + i, stop, counts, i)) for i in range(args.threads)
    ]
    t0 = time.time()
    for w in workers:
        w.start()
    samples = []
    end = t0 + args.minutes * 60
    while time.time() < end:
        time.sleep(min(10.0, max(0.0, end - time.time())))
        samples.append((time.time() - t0, rss_mib(), sum(counts)))
        print(f"{samples[-1][0]:7.0f} s  RSS {samples[-1][1]:7.1f} MiB  {samples[-1][2]} rounds", flush=True)
    stop.set()
    for w in workers:
        w.join()
    # RSS moves between plateaus as sessions' KV caches come and go: compare the peaks of the
    # first and last thirds after warm-up (growth there is a leak; single samples are not).
    warm = [r for t, r, _ in samples if t >= min(60.0, args.minutes * 60 / 3)]
    third = max(1, len(warm) // 3)
    first, last = max(warm[:third]), max(warm[-third:])
    print(f"rounds {sum(counts)}; RSS after warm-up {min(warm):.1f}-{max(warm):.1f} MiB; "
          f"peak of the first third {first:.1f}, of the last third {last:.1f} "
          f"(growth {last - first:+.1f} MiB)")


if __name__ == "__main__":
    main()
