# %% [markdown]
# # llama_core in a notebook
# Cells as a Jupyter/VS Code notebook would run them (`# %%` markers). Run as a script too:
# `python examples/python/notebook.py [MODEL]`.

# %%
import os
import sys

import numpy as np

import llama_core

cache = os.environ.get("LLAMA_CORE_CACHE", os.path.expanduser("~/.cache/llama-core"))
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")
model = llama_core.Model.load(path, progress=True)
model

# %% Tokens
ids = model.tokenize("Hello, notebook!")
print(ids, [model.detokenize([i]) for i in ids])

# %% Next-token distribution as a numpy array
session = model.session()
session.eval(model.tokenize("The capital of France is"))
logits = session.logits()
probs = np.exp(logits - logits.max())
probs /= probs.sum()
for token, p in sorted(enumerate(probs), key=lambda x: -x[1])[:5]:
    print(f"{model.detokenize([token])!r:>12} {p:.3f}")

# %% Greedy continuation, then fork and sample two different endings
print(session.generate([], max_tokens=8, sampler=llama_core.Sampler.greedy()))
a, b = session.fork(), session.fork()
print(a.generate(" Also,", max_tokens=12, sampler=llama_core.Sampler(seed=1)))
print(b.generate(" Also,", max_tokens=12, sampler=llama_core.Sampler(seed=2)))

# %% Embeddings: cosine similarity
def cos(x, y):
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))

e = {t: model.embed(t) for t in ["a cat", "a kitten", "a spreadsheet"]}
print("cat~kitten", round(cos(e["a cat"], e["a kitten"]), 3), "cat~spreadsheet", round(cos(e["a cat"], e["a spreadsheet"]), 3))

# %% Save the session and pick it up later
blob = session.save_state()
restored, _ = llama_core.Session.restore(model, blob)
assert restored.tokens == session.tokens
print(f"saved {len(blob) / 1e6:.1f} MB of state for {len(session)} tokens")
session.close()
