#!/usr/bin/env python3
"""Writes a random-weight GGUF of Llama 3.2 1B's shape (hidden 2048, 16 layers, 32/8 heads,
head 64, ffn 8192) with SmolLM2's tokenizer (49152 tokens), in f16, then quantizes it with
llama.cpp's own `llama_model_quantize` (llama-cpp-python) to the type asked (default q4_1).
Compute does not depend on the weights' values, so this serves every speed measurement at a
real size.

Usage: make_1b.py OUT.gguf [TYPE] [--from F16.gguf]
TYPE: f16, q4_0, q4_1, q5_0, q5_1, q8_0, the pure k-quants q4_k, q5_k, q6_k (every matrix of
that type, llama.cpp's `pure`), or llama.cpp's mixes q4_k_m, q5_k_m. `--from` quantizes an f16
file this script wrote before instead of drawing the weights again. Needs the refvenv (gguf,
numpy, llama-cpp-python (not for f16); run with ~/.cache/llama-core/refvenv/bin/python)."""

import os
import sys

import gguf
import numpy as np


# llama.cpp's file types (llama_ftype), and whether every matrix takes the type (`pure`).
FTYPES = {"q4_0": (2, False), "q4_1": (3, False), "q8_0": (7, False), "q5_0": (8, False),
          "q5_1": (9, False), "q4_k": (15, True), "q5_k": (17, True), "q6_k": (18, True),
          "q4_k_m": (15, False), "q5_k_m": (17, False)}


def quantize(src, out, qtype):
    import llama_cpp

    if qtype not in FTYPES:
        sys.exit(f"unknown type {qtype}: f16 or one of {', '.join(FTYPES)}")
    ftype, pure = FTYPES[qtype]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.pure = pure
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), p)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed: {rc}")
    print(out)


def main():
    args = sys.argv[1:]
    src = None
    if "--from" in args:
        i = args.index("--from")
        src = args[i + 1]
        del args[i:i + 2]
    out = args[0]
    qtype = args[1] if len(args) > 1 else "q4_1"
    if src is not None:
        quantize(src, out, qtype)
        return
    src = os.path.expanduser("~/.cache/llama-core/SmolLM2-135M-Instruct.Q4_1.gguf")
    r = gguf.GGUFReader(src)
    h, layers, heads, kv, hd, ff = 2048, 16, 32, 8, 64, 8192
    tmp = out + ".f16.gguf"
    w = gguf.GGUFWriter(tmp, arch="llama")
    w.add_name("random-llama-3.2-1b-shape")
    w.add_context_length(8192)
    w.add_embedding_length(h)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    # The tokenizer of SmolLM2, key for key.
    for f in r.fields.values():
        if not f.name.startswith("tokenizer."):
            continue
        if f.name == "tokenizer.chat_template":
            w.add_chat_template(bytes(f.parts[f.data[0]]).decode())
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            sub = f.types[1]
            vals = [f.parts[i] for i in f.data]
            if sub == gguf.GGUFValueType.STRING:
                w.add_array(f.name, [bytes(v).decode("utf-8", "surrogateescape") for v in vals])
            else:
                w.add_array(f.name, [v.tolist()[0] for v in vals])
        elif t == gguf.GGUFValueType.STRING:
            w.add_string(f.name, bytes(f.parts[f.data[0]]).decode())
        elif t == gguf.GGUFValueType.BOOL:
            w.add_bool(f.name, bool(f.parts[f.data[0]][0]))
        else:
            w.add_uint32(f.name, int(f.parts[f.data[0]][0]))
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(0)

    def t(name, *shape, scale=0.02):
        w.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16))

    t("token_embd.weight", vocab, h)
    for l in range(layers):
        w.add_tensor(f"blk.{l}.attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(f"blk.{l}.ffn_norm.weight", np.ones(h, dtype=np.float32))
        t(f"blk.{l}.attn_q.weight", heads * hd, h)
        t(f"blk.{l}.attn_k.weight", kv * hd, h)
        t(f"blk.{l}.attn_v.weight", kv * hd, h)
        t(f"blk.{l}.attn_output.weight", h, heads * hd)
        t(f"blk.{l}.ffn_gate.weight", ff, h)
        t(f"blk.{l}.ffn_up.weight", ff, h)
        t(f"blk.{l}.ffn_down.weight", h, ff)
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if qtype == "f16":
        os.replace(tmp, out)
        print(out)
        return
    try:
        quantize(tmp, out, qtype)
    finally:
        os.remove(tmp)


if __name__ == "__main__":
    main()
