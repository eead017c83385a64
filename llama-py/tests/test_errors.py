import os
import subprocess

import pytest

import llama_core


def test_hierarchy():
    for cls in [
        llama_core.ModelLoadError,
        llama_core.TokenizerError,
        llama_core.ChatTemplateError,
        llama_core.ContextOverflowError,
        llama_core.GenerationCancelled,
        llama_core.SessionStateError,
        llama_core.InvalidArgumentError,
    ]:
        assert issubclass(cls, llama_core.LlamaError)
    assert issubclass(llama_core.InvalidArgumentError, ValueError)


def test_missing_file_and_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        llama_core.Model.load(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    with pytest.raises(llama_core.ModelLoadError):
        llama_core.Model.load(bad)
    with pytest.raises(llama_core.ModelLoadError):
        llama_core.Model.load(tmp_path)  # a folder without config.json


def test_context_overflow(model):
    s = model.session(n_ctx=8)
    with pytest.raises(llama_core.ContextOverflowError):
        s.eval(list(range(9)))
    s.eval(list(range(8)))
    with pytest.raises(llama_core.ContextOverflowError):
        s.generate([], max_tokens=4, sampler=llama_core.Sampler.greedy())


def test_cancelled_prompt(model):
    s = model.session(n_batch=2)
    s.cancel()
    with pytest.raises(llama_core.GenerationCancelled):
        s.eval(model.tokenize("one two three four five six"))
    s.eval([1])


def test_chat_template_error(model_path, llama_bin, tmp_path):
    out = tmp_path / "hf"
    subprocess.run([llama_bin, "export-hf", model_path, str(out)], check=True, capture_output=True)
    os.remove(out / "tokenizer_config.json")
    m = llama_core.Model.load(out)
    assert m.format == "safetensors"
    with pytest.raises(llama_core.ChatTemplateError):
        m.apply_chat_template([{"role": "user", "content": "hi"}])


def test_wrong_types_and_values(model):
    s = model.session()
    with pytest.raises(TypeError):
        s.eval("not ids")
    with pytest.raises((OverflowError, TypeError, ValueError)):
        s.eval([-1])
    with pytest.raises((OverflowError, TypeError, ValueError)):
        s.eval([2**40])
    with pytest.raises(llama_core.InvalidArgumentError):
        s.eval([10**6])
    with pytest.raises(TypeError):
        model.tokenize(None)
    with pytest.raises(ValueError):
        s.generate(3.5)
    with pytest.raises(ValueError):
        s.chat(["not a dict"])
    with pytest.raises(ValueError):
        model.session(kv_type="f8")
    with pytest.raises(ValueError):
        llama_core.Sampler(temperature=-1)
    with pytest.raises(ValueError):
        llama_core.Sampler(top_p=1.5)
    with pytest.raises((OverflowError, TypeError)):
        llama_core.Sampler(seed=-1)
    with pytest.raises(llama_core.InvalidArgumentError):
        model.detokenize([10**6])
    with pytest.raises(llama_core.InvalidArgumentError):
        llama_core.Sampler.greedy().sample(model.session())


def test_tokenizer_error(model_path, llama_bin, tmp_path):
    out = tmp_path / "hf"
    subprocess.run([llama_bin, "export-hf", model_path, str(out)], check=True, capture_output=True)
    (out / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(llama_core.TokenizerError):
        llama_core.Model.load(out)
