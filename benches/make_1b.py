#!/usr/bin/env python3
"""Writes a random-weight GGUF of Llama 3.2 1B's shape (hidden 2048, 16 layers, 32/8 heads,
head 64, ffn 8192) with SmolLM2's tokenizer (49152 tokens), in f16, then quantizes it with
llama.cpp's own `llama_model_quantize` (llama-cpp-python) to the type asked (default q4_1).
Compute does not depend on the weights' values, so this serves every speed measurement at a
real size. Usage: make_1b.py OUT.gguf [q4_1|q4_0|q8_0|q4_k|f16]   (needs the refvenv: gguf, numpy,
llama-cpp-python (not for f16); run with ~/.cache/llama-core/refvenv/bin/python)."""

import os
import sys

import gguf
import numpy as np


def main():
    out = sys.argv[1]
    qtype = sys.argv[2] if len(sys.argv) > 2 else "q4_1"
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
    import llama_cpp

    ftype = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k": 15}[qtype]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(tmp.encode(), out.encode(), p)
    os.remove(tmp)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed: {rc}")
    print(out)


if __name__ == "__main__":
    main()
