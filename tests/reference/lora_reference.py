#!/usr/bin/env python3
"""llama.cpp's outputs with a LoRA adapter on SmolLM2-135M-Instruct Q4_1, for the tests.

The adapter is random but reproducible without any RNG library: every value comes from a
splitmix64 hash of (seed, tensor index, element index), so the Rust test rebuilds the same
values bit for bit (llama-core/tests/real_model.rs, `lora_*`). All seven projections of every
layer, rank 16, alpha 16 (factor 1), matrices in f32.

Written to tests/reference/smollm2_lora.json:
  adapter       the recipe (seed, rank, alpha, amplitudes) and sums of the values (a check)
  base          llama.cpp's greedy tokens without the adapter
  lora          llama.cpp's greedy tokens and top-1/top-2 margins with the GGUF LoRA file this
                script writes with the `gguf` package (llama.cpp's own writer)
  converted     the same adapter written as a PEFT folder (Hugging Face row order), converted by
                `llama lora convert`, and run by llama.cpp: its greedy tokens (must equal `lora`'s
                up to near-ties)

Usage: python3 tests/reference/lora_reference.py [--model PATH] [--llama target/release/llama]
Never run by CI; `make reference` runs it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from make_reference import GREEDY_PROMPTS, ensure_venv, greedy  # noqa: E402

SEED = 20261201
RANK = 16
ALPHA = 16.0
AMP_A = 0.25
AMP_B = 0.125
PROMPTS = GREEDY_PROMPTS[:6]
N = 32
# (HF module, GGUF name, permuted heads key)
TARGETS = [
    ("self_attn.q_proj", "attn_q", "heads"),
    ("self_attn.k_proj", "attn_k", "kv_heads"),
    ("self_attn.v_proj", "attn_v", None),
    ("self_attn.o_proj", "attn_output", None),
    ("mlp.gate_proj", "ffn_gate", None),
    ("mlp.up_proj", "ffn_up", None),
    ("mlp.down_proj", "ffn_down", None),
]


def hashed(np, k, n, amp):
    """Values of tensor k: splitmix64(seed + k*G + i*M1), top 24 bits, centred, times amp."""
    M1, M2, G = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint64)
        x = np.uint64((SEED + k * G) % 2**64) + i * np.uint64(M1)
        x ^= x >> np.uint64(30)
        x *= np.uint64(M1)
        x ^= x >> np.uint64(27)
        x *= np.uint64(M2)
        x ^= x >> np.uint64(31)
    return (((x >> np.uint64(40)).astype(np.float64) / 2**24 - 0.5) * amp).astype(np.float32)


def shapes(cfg):
    h, nh, nkv, ff = cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["ff"]
    hd = h // nh
    return {
        "self_attn.q_proj": (nh * hd, h), "self_attn.k_proj": (nkv * hd, h),
        "self_attn.v_proj": (nkv * hd, h), "self_attn.o_proj": (h, nh * hd),
        "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h), "mlp.down_proj": (h, ff),
    }


def adapter(np, cfg):
    """[(layer, module, gguf name, heads or None, A [r, in], B [out, r] in HF order)]"""
    out = []
    sh = shapes(cfg)
    for l in range(cfg["layers"]):
        for ti, (module, gname, heads) in enumerate(TARGETS):
            o, i = sh[module]
            k = (l * 7 + ti) * 2
            a = hashed(np, k, RANK * i, AMP_A).reshape(RANK, i)
            b = hashed(np, k + 1, o * RANK, AMP_B).reshape(o, RANK)
            out.append((l, module, gname, cfg[heads] if heads else None, a, b))
    return out


def permute(np, w, n_head):
    """llama.cpp's converter's HF -> GGUF row order for Q/K (rows of w)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_lora(np, path, pairs):
    import gguf

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", ALPHA)
    for l, _module, gname, heads, a, b in pairs:
        bb = permute(np, b, heads) if heads else b
        w.add_tensor(f"blk.{l}.{gname}.weight.lora_a", np.ascontiguousarray(a))
        w.add_tensor(f"blk.{l}.{gname}.weight.lora_b", np.ascontiguousarray(bb))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_peft(np, folder, pairs):
    import struct

    os.makedirs(folder, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
           "target_modules": [m.split(".")[1] for m, _, _ in TARGETS], "bias": "none"}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    # safetensors by hand (no torch here): header JSON, then the raw little-endian data.
    header, blobs, off = {}, [], 0
    for l, module, _g, _h, a, b in pairs:
        for name, t in ((f"base_model.model.model.layers.{l}.{module}.lora_A.weight", a),
                        (f"base_model.model.model.layers.{l}.{module}.lora_B.weight", b)):
            data = np.ascontiguousarray(t, dtype="<f4").tobytes()
            header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
            blobs.append(data)
            off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for d in blobs:
            f.write(d)


def main():
    ensure_venv()
    import llama_cpp
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--llama", default=os.path.join(ROOT, "target", "release", "llama"))
    ap.add_argument("--out", default=os.path.join(HERE, "smollm2_lora.json"))
    args = ap.parse_args()
    model = args.model or subprocess.check_output(["bash", os.path.join(ROOT, "scripts", "fetch-model.sh")], text=True).strip()
    base = llama_cpp.Llama(model, n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=2)
    md = base.metadata
    cfg = {"hidden": int(md["llama.embedding_length"]), "heads": int(md["llama.attention.head_count"]),
           "kv_heads": int(md["llama.attention.head_count_kv"]), "ff": int(md["llama.feed_forward_length"]),
           "layers": int(md["llama.block_count"])}
    pairs = adapter(np, cfg)
    out = {"model": os.path.basename(model), "llama_cpp_python": llama_cpp.__version__,
           "adapter": {"seed": SEED, "rank": RANK, "alpha": ALPHA, "amp_a": AMP_A, "amp_b": AMP_B,
                       "sum_a": float(sum(float(p[4].astype(np.float64).sum()) for p in pairs)),
                       "sum_b": float(sum(float(p[5].astype(np.float64).sum()) for p in pairs))},
           "n": N, "base": [], "lora": [], "converted": []}
    for p in PROMPTS:
        ids = base.tokenize(p.encode(), add_bos=True, special=True)
        g, margins, _ = greedy(base, np, ids, N)
        out["base"].append({"prompt": p, "prompt_ids": ids, "ids": g, "margins": margins})
    del base
    with tempfile.TemporaryDirectory() as tmp:
        lora_path = os.path.join(tmp, "lora.gguf")
        write_gguf_lora(np, lora_path, pairs)
        llm = llama_cpp.Llama(model, n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=2, lora_path=lora_path)
        for case in out["base"]:
            g, margins, _ = greedy(llm, np, case["prompt_ids"], N)
            out["lora"].append({"prompt": case["prompt"], "prompt_ids": case["prompt_ids"], "ids": g, "margins": margins})
            print(f"lora {case['prompt'][:30]!r}: {llm.detokenize(g).decode('utf-8', 'replace')[:60]!r}", file=sys.stderr)
        del llm
        peft = os.path.join(tmp, "peft")
        write_peft(np, peft, pairs)
        conv = os.path.join(tmp, "converted.gguf")
        subprocess.check_call([args.llama, "lora", "convert", "--model", model, peft, conv])
        llm = llama_cpp.Llama(model, n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=2, lora_path=conv)
        for case in out["base"]:
            g, margins, _ = greedy(llm, np, case["prompt_ids"], N)
            out["converted"].append({"prompt": case["prompt"], "ids": g, "margins": margins})
        del llm
    changed = sum(a["ids"] != b["ids"] for a, b in zip(out["base"], out["lora"]))
    same = sum(a["ids"] == b["ids"] for a, b in zip(out["lora"], out["converted"]))
    print(f"the adapter changes {changed}/{len(PROMPTS)} greedy continuations; "
          f"the converted PEFT adapter gives llama.cpp's tokens on {same}/{len(PROMPTS)}", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
