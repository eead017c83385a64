import json
import subprocess
import sys

# Two sessions of one model, each generating in its own Python thread, must be inside their
# native calls at the same time: the GIL is released during generation. The check observes the
# overlap itself (no timing): the switch interval is set so high that the interpreter never
# takes the GIL from a thread, so the main thread can only run while a worker sits in a call
# that released it. With `threads=1` each session computes on its own thread, so the overlap is
# real concurrency, and both threads' tokens must equal the serial run's.
SCRIPT = r"""
import json, sys, threading, time
import llama_core

model = llama_core.Model.load(sys.argv[1], threads=1)
PROMPTS = ["Once upon a time", "The meaning of life is"]

def run(prompt):
    with model.session() as s:
        s.generate(prompt, max_tokens=48, sampler=llama_core.Sampler.greedy())
        return s.last_generation["tokens"]

serial = [run(p) for p in PROMPTS]
results = [None, None]
inside = [False, False]
both_inside = False

def worker(i):
    with model.session() as s:
        inside[i] = True
        s.generate(PROMPTS[i], max_tokens=48, sampler=llama_core.Sampler.greedy())
        inside[i] = False
        results[i] = s.last_generation["tokens"]

sys.setswitchinterval(1000.0)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
for t in threads:
    t.start()
# `time.sleep` releases the GIL; the main thread runs again only when no worker holds it.
while any(t.is_alive() for t in threads):
    if inside[0] and inside[1]:
        both_inside = True
    time.sleep(0.0005)
for t in threads:
    t.join()
print(json.dumps({"both_inside": both_inside, "same": results == serial}))
"""


def test_two_sessions_generate_at_once_in_two_threads(model_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, model_path], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["both_inside"], "both sessions must be inside generate at once (the GIL released)"
    assert r["same"], "threads must not change results"
