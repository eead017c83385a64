#!/usr/bin/env python3
"""Generates the llama.cpp reference outputs the tests compare against.

Runs llama.cpp through llama-cpp-python (installed into its own virtual environment on first
use: compiling llama.cpp takes several minutes) on SmolLM2-135M-Instruct Q4_1 and writes
tests/reference/smollm2.json:

  tokenize   ids for a corpus of tricky strings (parse_special off and on)
  greedy     48-token greedy continuations, llama.cpp's top-1/top-2 margin at every step, and
             the top-10 logits at the last prompt position
  chat       chat prompts rendered with the GGUF's own template by Python's jinja2 (as
             transformers does), their ids, and greedy replies with margins
  dense      full last-position logits of the same weights dequantized to F32 (converted by our
             `llama quantize --type f32`), run by llama.cpp with an F32 KV cache

Usage: python3 tests/reference/make_reference.py [--model PATH] [--llama target/release/llama]
Never run by CI (too slow); rerun and commit the JSON when the corpus changes.
"""
# llama.cpp's native build compiles AMX kernels that fault on these machines (SIGSEGV at the
# first ldtilecfg on quantized files): the ISA is listed instead, AMX off.
LLAMA_CPP_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"

TOKENIZE_CORPUS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "Hello world", " Hello world",
    "Hello  world", "hello\tworld", "line1\nline2\r\nline3", "12345", "3.14159",
    "1,000,000 and 2024-01-01", "emoji 😀🎉👍🏽", "👨‍👩‍👧‍👦", "日本語のテキスト", "中文测试",
    "한국어", "café résumé naïve", "Ünïcödé Ñ", "Привет мир", "مرحبا بالعالم",
    "def foo(x):\n    return x * 2\n", "    indented", "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>", "a<|im_end|>b", "don't won't I'm they'll we've", "HTTP/1.1 200 OK",
    "https://example.com/path?q=1&r=2", "!!!???...", "x = [1, 2, 3]; y = {'a': 1}",
    "The quick brown fox jumps over the lazy dog.", "   leading and trailing   ", "ß ẞ ǅ",
    "\u00a0non-breaking\u00a0space", "tabs\t\tand  spaces", "Mixed CASE WoRdS", "a" * 50,
    "🙂" * 5, "\\escaped\\", "<unk> <s> </s>", "x\u0000y", "ﬁ ligature ½",
]

LONG_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based inks and a wooden press adapted from "
    "wine making. Books, which had been copied by hand for centuries, could now be produced in "
    "hundreds of identical copies. Within fifty years presses operated in more than two hundred "
    "cities across Europe, and the price of books fell sharply. Historians argue that this "
    "change helped spread the Renaissance, the Reformation and the scientific revolution, "
    "because ideas could travel quickly and accurately. In summary, the printing press"
)

GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "The meaning of life is",
    "Translate to French: Hello, how are you?",
    "Q: What is the largest planet in our solar system?\nA:",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    LONG_PROMPT,
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about the sea."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Name three colors."},
    ],
    [{"role": "user", "content": "Write one sentence about cats. Use the emoji 🐱."}],
]

PPL_FILE = "/usr/share/common-licenses/GPL-3"
PPL_CTX = 512
PPL_CHUNKS = 4
DENSE_PROMPTS = ["The capital of France is", GREEDY_PROMPTS[7]]
N_GREEDY = 48


def ensure_venv():
    """Re-executes inside a venv that has llama-cpp-python, creating it if needed."""
    try:
        import llama_cpp  # noqa: F401
        import jinja2  # noqa: F401
        import numpy  # noqa: F401
        return
    except ImportError:
        pass
    venv = os.environ.get("LLAMA_REF_VENV", os.path.expanduser("~/.cache/llama-core/refvenv"))
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", LLAMA_CPP_CMAKE_ARGS))
    subprocess.check_call([py, "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON, "jinja2", "numpy"], env=env)
    os.execv(py, [py] + sys.argv)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def greedy(llm, np, prompt_ids, n, token_by_token=False):
    import llama_cpp

    """Greedy decode: batched prompt, then one token at a time (as the library does)."""
    llm.reset()
    if token_by_token:
        for t in prompt_ids:
            llm.eval([t])
    else:
        llm.eval(prompt_ids)
    last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    order = np.argsort(-last)[:10]
    top10 = [[int(i), float(last[i])] for i in order]
    ids, margins = [], []
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for _ in range(n):
        l = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        o = np.argsort(-l)[:2]
        ids.append(int(o[0]))
        margins.append(float(l[o[0]] - l[o[1]]))
        if llama_cpp.llama_vocab_is_eog(vocab, int(o[0])):
            break
        llm.eval([int(o[0])])
    return ids, margins, top10


# Files written by this library that llama.cpp must load and run: each is made from the
# shipped model by the listed `llama` commands ({model}: the shipped file, {tmp}: a scratch
# folder, {out}: the file llama.cpp loads). The test repeats the recipe, checks the file's
# sha256 and compares its greedy tokens with llama.cpp's on the same file.
ROUNDTRIP = [
    {"name": "q4_0", "steps": [["quantize", "{model}", "{out}", "--type", "q4_0"]]},
    {"name": "q4_k", "steps": [["quantize", "{model}", "{out}", "--type", "q4_k"]]},
    {"name": "q8_0", "steps": [["quantize", "{model}", "{out}", "--type", "q8_0"]]},
    {"name": "hf_f16_to_q8_0", "steps": [["export-hf", "{model}", "{tmp}/hf", "--type", "f16"],
                                         ["quantize", "{tmp}/hf", "{out}", "--type", "q8_0"]]},
]
ROUNDTRIP_PROMPTS = GREEDY_PROMPTS[:4]
ROUNDTRIP_TOKENIZE = TOKENIZE_CORPUS[:24]
N_ROUNDTRIP = 32


def variant_spread(path, cases, n, np):
    """llama.cpp against itself on one file: flash attention on, and the prompt evaluated one
    token at a time, next to the default run. `divergence_margins`: the default run's
    top-1/top-2 margin where a variant's greedy tokens part from it. `margin_spread`: the largest
    change of that margin between the default and a variant over the steps where their tokens
    still agree (how far llama.cpp's own arithmetic moves a margin)."""
    import llama_cpp

    divergence, spread = [], 0.0
    for fa, tbt in [(True, False), (False, True)]:
        other = llama_cpp.Llama(path, n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=2, flash_attn=fa)
        for case in cases:
            ids, margins, _ = greedy(other, np, case["prompt_ids"], n, token_by_token=tbt)
            ref = case["ids"]
            same = next((i for i in range(min(len(ids), len(ref))) if ids[i] != ref[i]), None)
            if same is not None:
                divergence.append(case["margins"][same])
            upto = min(len(ids), len(ref)) if same is None else same
            for a, b in zip(case["margins"][:upto], margins[:upto]):
                spread = max(spread, abs(a - b))
        del other
    return {"divergence_margins": sorted(divergence), "margin_spread": spread}


def roundtrip(args, model, np):
    import llama_cpp

    out = []
    for case in ROUNDTRIP:
        with tempfile.TemporaryDirectory() as tmp:
            dst = os.path.join(tmp, case["name"] + ".gguf")
            for step in case["steps"]:
                cmd = [a.format(model=model, tmp=tmp, out=dst) for a in step]
                subprocess.check_call([args.llama] + cmd)
            llm = llama_cpp.Llama(dst, n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=2)
            entry = {"name": case["name"], "steps": case["steps"], "sha256": sha256(dst),
                     "tokenize": [], "greedy": []}
            for text in ROUNDTRIP_TOKENIZE:
                entry["tokenize"].append({"text": text, "ids": llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)})
            for p in ROUNDTRIP_PROMPTS:
                prompt_ids = llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
                ids, margins, _ = greedy(llm, np, prompt_ids, N_ROUNDTRIP)
                entry["greedy"].append({"prompt": p, "prompt_ids": prompt_ids, "ids": ids, "margins": margins})
            print(f"roundtrip {case['name']}: {llm.detokenize(entry['greedy'][0]['ids']).decode('utf-8', 'replace')[:60]!r}", file=sys.stderr)
            del llm
            entry["llama_cpp_variants"] = variant_spread(dst, entry["greedy"], N_ROUNDTRIP, np)
            print(f"roundtrip {case['name']}: llama.cpp's own variants {entry['llama_cpp_variants']}", file=sys.stderr)
            out.append(entry)
    return out


def main():
    ensure_venv()
    import jinja2
    import llama_cpp
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--llama", default=os.path.join(ROOT, "target", "release", "llama"))
    ap.add_argument("--out", default=os.path.join(HERE, "smollm2.json"))
    ap.add_argument("--only-roundtrip", action="store_true",
                    help="recompute only the round-trip section of an existing fixture")
    args = ap.parse_args()
    model = args.model or subprocess.check_output(["bash", os.path.join(ROOT, "scripts", "fetch-model.sh")], text=True).strip()
    if args.only_roundtrip:
        with open(args.out) as f:
            out = json.load(f)
        out["roundtrip"] = roundtrip(args, model, np)
        with open(args.out, "w") as f:
            json.dump(out, f, ensure_ascii=False, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
        return

    llm = llama_cpp.Llama(model, n_ctx=2048, n_batch=512, logits_all=True, verbose=False, n_threads=2)
    out = {
        "model": os.path.basename(model),
        "sha256": sha256(model),
        "llama_cpp_python": llama_cpp.__version__,
        "n_greedy": N_GREEDY,
    }
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out["eog_ids"] = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    out["tokenize"] = []
    for text in TOKENIZE_CORPUS:
        for special in (False, True):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)
            out["tokenize"].append({"text": text, "add_special": True, "parse_special": special, "ids": ids})
    out["greedy"] = []
    for p in GREEDY_PROMPTS:
        prompt_ids = llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
        ids, margins, top10 = greedy(llm, np, prompt_ids, N_GREEDY)
        out["greedy"].append({"prompt": p, "prompt_ids": prompt_ids, "ids": ids, "margins": margins, "top10": top10})
        print(f"greedy {p[:30]!r}: {llm.detokenize(ids).decode('utf-8', 'replace')[:60]!r}", file=sys.stderr)
    # llama.cpp's own numerical spread: the same greedy runs with flash attention on, and with
    # the prompt evaluated one token at a time. Where they part from the default run, and at
    # which top-1/top-2 margin, tells how large a margin numerical noise alone can flip.
    variants = [("flash_attn", True, False), ("token_by_token", False, True), ("flash_attn_token_by_token", True, True)]
    spread = []
    for name, fa, tbt in variants:
        other = llama_cpp.Llama(model, n_ctx=2048, n_batch=512, logits_all=True, verbose=False, n_threads=2, flash_attn=fa)
        for case in out["greedy"]:
            ids, _, _ = greedy(other, np, case["prompt_ids"], N_GREEDY, token_by_token=tbt)
            ref = case["ids"]
            i = next((i for i in range(min(len(ids), len(ref))) if ids[i] != ref[i]), None)
            if i is not None:
                spread.append({"variant": name, "prompt": case["prompt"], "step": i, "margin": case["margins"][i]})
        del other
    out["llama_cpp_self_divergence"] = spread
    print("llama.cpp self-divergence margins:", sorted(round(x["margin"], 3) for x in spread), file=sys.stderr)
    # Perplexity, llama.cpp's method (as its perplexity tool): windows of PPL_CTX tokens from an
    # empty cache, BOS in front when the model adds one, the second half of each window scored.
    text = open(PPL_FILE, encoding="utf-8").read()
    toks = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(vocab)
    nll, count, per_chunk = 0.0, 0, []
    n_chunks = min(len(toks) // PPL_CTX, PPL_CHUNKS)
    for i in range(n_chunks):
        window = list(toks[i * PPL_CTX:(i + 1) * PPL_CTX])
        if add_bos:
            window[0] = llm.token_bos()
        llm.reset()
        llm.eval(window)
        for j in range(PPL_CTX // 2, PPL_CTX - 1):
            row = np.array(llm.scores[j], dtype=np.float64)
            m = row.max()
            lse = m + np.log(np.exp(row - m).sum())
            nll += lse - row[toks[i * PPL_CTX + j + 1]]
            count += 1
        per_chunk.append(float(np.exp(nll / count)))
    out["perplexity"] = {"file": PPL_FILE, "n_ctx": PPL_CTX, "chunks": n_chunks, "n_tokens": len(toks),
                         "perplexity": float(np.exp(nll / count)), "per_chunk": per_chunk}
    print("perplexity", out["perplexity"]["perplexity"], file=sys.stderr)
    template = llm.metadata["tokenizer.chat_template"]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) if hasattr(jinja2, "sandbox") else jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string(template)
    out["chat"] = []
    for messages in CHATS:
        text = tmpl.render(messages=messages, add_generation_prompt=True, bos_token="<|im_start|>", eos_token="<|im_end|>")
        prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        ids, margins, _ = greedy(llm, np, prompt_ids, N_GREEDY)
        out["chat"].append({"messages": messages, "rendered": text, "prompt_ids": prompt_ids, "ids": ids, "margins": margins})
    del llm

    # Dense reference: the same weights dequantized to F32, F32 KV cache.
    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "model-f32.gguf")
        subprocess.check_call([args.llama, "quantize", model, f32, "--type", "f32"])
        dense = llama_cpp.Llama(f32, n_ctx=512, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
        out["dense"] = []
        for p in DENSE_PROMPTS:
            ids = dense.tokenize(p.encode("utf-8"), add_bos=True, special=True)
            dense.reset()
            dense.eval(ids)
            last = np.array(dense.scores[dense.n_tokens - 1], dtype="<f4")
            out["dense"].append({"prompt": p, "prompt_ids": ids, "logits_f32_b64": base64.b64encode(last.tobytes()).decode()})
        del dense
    out["roundtrip"] = roundtrip(args, model, np)
    with open(args.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
