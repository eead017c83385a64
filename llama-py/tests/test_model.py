import numpy as np
import pytest

import llama_core


def test_load_and_repr(model):
    r = repr(model)
    assert "architecture='llama'" in r and "Q4_1" in r and "layers=30" in r
    assert model.n_vocab == 49152 and model.n_embd == 576 and model.n_layers == 30
    assert model.weight_type == "Q4_1" and model.format == "gguf"
    assert model.chat_template and "im_start" in model.chat_template
    assert model.eog_ids == [0, 2, 4]
    assert model.is_eog(2) and not model.is_eog(100)


def test_tokenization_matches_llama_cpp(model, reference):
    for case in reference["tokenize"]:
        ids = model.tokenize(case["text"], add_special=case["add_special"], parse_special=case["parse_special"])
        assert ids == case["ids"], case["text"]


def test_detokenize_roundtrip(model):
    for text in ["Hello world", "emoji 😀", "日本語", "a\tb\n"]:
        assert model.detokenize(model.tokenize(text)) == text


def test_chat_template_matches_jinja2(model, reference):
    for case in reference["chat"]:
        assert model.apply_chat_template(case["messages"]) == case["rendered"]


def test_embeddings_are_float32_arrays(model):
    e = model.embed("Hello world")
    assert isinstance(e, np.ndarray) and e.dtype == np.float32 and e.shape == (576,)
    last = model.embed("Hello world", pooling="last")
    assert last.shape == (576,) and not np.allclose(e, last)
    assert np.array_equal(model.embed("Hello world"), e)
    with pytest.raises(ValueError):
        model.embed("x", pooling="max")


def test_progress_argument(model_path, capsys):
    m = llama_core.Model.load(model_path, progress=True)
    assert m.n_vocab == 49152


def test_pickle_model(model):
    import pickle

    m2 = pickle.loads(pickle.dumps(model))
    assert m2.path == model.path and m2.tokenize("hi") == model.tokenize("hi")


def test_logs_go_to_python_logging(model_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="llama_core"):
        llama_core.Model.load(model_path)
    assert any("model loaded" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert all(r.name.startswith("llama_core") for r in caplog.records)


def test_quantize_at_load(model_path, llama_bin, tmp_path):
    import subprocess

    out = tmp_path / "hf"
    subprocess.run([llama_bin, "export-hf", model_path, str(out)], check=True, capture_output=True)
    q = llama_core.Model.load(out, quantize="q8_0")
    assert q.weight_type == "Q8_0"
    with q.session() as s:
        assert s.generate("1, 2, 3, 4, 5,", max_tokens=6, sampler=llama_core.Sampler.greedy()).startswith(" 6, 7")
    with pytest.raises(ValueError):
        llama_core.Model.load(out, quantize="q3_x")


def test_threads_and_kernel_are_arguments(model_path):
    one = llama_core.Model.load(model_path, threads=1, kernel="scalar")
    assert one.threads == 1 and one.kernel == "scalar"
    auto = llama_core.Model.load(model_path)
    assert auto.kernel in ("scalar", "avx2", "vnni256", "avx512")
    ids = one.tokenize("The capital of France is")
    s = one.session(threads=2, kv_type="f32")
    s.eval(ids)
    t = auto.session(kv_type="f32")
    t.eval(ids)
    assert int(s.logits().argmax()) == int(t.logits().argmax())
    with pytest.raises(ValueError):
        llama_core.Model.load(model_path, kernel="avx1024")
    with pytest.raises(ValueError):
        llama_core.Model.load(model_path, threads=1 << 20)


def test_kv_cache_types(model):
    ids = model.tokenize("The capital of France is")
    tops = {}
    for kv in ("f16", "f32", "q8_0", "q4_0"):
        s = model.session(kv_type=kv, n_ctx=64)
        assert f"kv_type_k='{kv}'" in repr(s) and f"kv_type_v='{kv}'" in repr(s)
        s.eval(ids)
        tops[kv] = int(s.logits().argmax())
    # A q8_0 cache keeps the clear next token of this prompt.
    assert tops["q8_0"] == tops["f32"] == tops["f16"]
    mixed = model.session(kv_type_k="q8_0", kv_type_v="f16")
    assert "kv_type_k='q8_0', kv_type_v='f16'" in repr(mixed)
    # A snapshot restores as recorded, or converted to other types.
    mixed.eval(ids)
    blob = mixed.save_state()
    same, _ = llama_core.Session.restore(model, blob)
    assert "kv_type_k='q8_0', kv_type_v='f16'" in repr(same)
    assert same.kv_cache_bytes == mixed.kv_cache_bytes > 0
    conv, _ = llama_core.Session.restore(model, blob, kv_type_v="q4_0")
    assert "kv_type_k='q8_0', kv_type_v='q4_0'" in repr(conv)
    assert conv.tokens == mixed.tokens
    assert conv.kv_cache_bytes < mixed.kv_cache_bytes
    both, _ = llama_core.Session.restore(model, blob, kv_type="f32")
    assert "kv_type_k='f32', kv_type_v='f32'" in repr(both)
    both.eval(ids[:1])
    assert len(both) == len(ids) + 1
    with pytest.raises(ValueError):
        llama_core.Session.restore(model, blob, kv_type_k="q3")
    with pytest.raises(ValueError):
        model.session(kv_type_v="q2_k")
    with pytest.raises(TypeError):
        model.session(kv_type_k=8)
