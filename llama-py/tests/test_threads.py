import json
import subprocess
import sys

# Run in a child process with one compute thread per session (`threads=1`), so that any overlap
# between two Python threads can only come from the GIL being released.
SCRIPT = r"""
import json, sys, threading, time
import llama_core

model = llama_core.Model.load(sys.argv[1], threads=1)
PROMPTS = ["Once upon a time", "The meaning of life is"]

def run(prompt):
    with model.session() as s:
        s.generate(prompt, max_tokens=48, sampler=llama_core.Sampler.greedy())
        return s.last_generation["tokens"]

run("warm up")
t0 = time.perf_counter()
serial = [run(p) for p in PROMPTS]
serial_time = time.perf_counter() - t0
results = [None, None]
def worker(i):
    results[i] = run(PROMPTS[i])
threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
t0 = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
parallel_time = time.perf_counter() - t0
print(json.dumps({"serial": serial_time, "parallel": parallel_time, "same": results == serial}))
"""


def test_two_sessions_run_concurrently(model_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, model_path], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["same"], "threads must not change results"
    # Two threads on 2 cores: clearly below the serial sum (loose bound, shared machines).
    assert r["parallel"] < 0.8 * r["serial"], r
