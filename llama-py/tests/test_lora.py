"""LoRA adapters from Python: load, apply per session, scale 0 is the base model, snapshots,
isolation between sessions, and clear errors."""
import json
import struct
import threading

import numpy as np
import pytest

import llama_core


def _write_peft(folder, model, rank=4, layers=(0, 1), seed=0):
    """A PEFT folder updating q_proj and o_proj (hidden x hidden) of `layers`, written by hand
    (safetensors: 8-byte header length, JSON header, raw f32)."""
    folder.mkdir(parents=True, exist_ok=True)
    h = model.n_embd
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "o_proj"],
           "layers_to_transform": list(layers), "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    header, blobs, off = {}, [], 0
    for layer in layers:
        for module in ("q_proj", "o_proj"):
            for ab, shape in (("lora_A", (rank, h)), ("lora_B", (h, rank))):
                data = (rng.standard_normal(shape) * 0.05).astype("<f4").tobytes()
                name = f"base_model.model.model.layers.{layer}.self_attn.{module}.{ab}.weight"
                header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(data)]}
                blobs.append(data)
                off += len(data)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))
    return folder


PROMPT = [1, 504, 3458, 282, 4649, 314]


def _logits(model, adapters):
    s = model.session(n_ctx=64)
    s.set_adapters(adapters)
    s.eval(PROMPT)
    return s.logits()


def test_an_adapter_changes_a_session_and_scale_zero_is_the_base(model, tmp_path):
    a = model.load_adapter(_write_peft(tmp_path / "a", model))
    assert isinstance(a, llama_core.Adapter)
    assert a.format == "peft" and a.targets == ["q", "o"] and a.n_matrices == 4 and a.max_rank == 4
    assert a.alpha == 8.0 and str(tmp_path / "a") in a.path and "Adapter(" in repr(a)
    base = _logits(model, [])
    with_a = _logits(model, [(a, 1.0)])
    assert np.abs(with_a - base).max() > 1e-2
    assert np.array_equal(_logits(model, [(a, 0.0)]), base)
    # Two adapters at once; a list or a tuple of pairs.
    b = model.load_adapter(_write_peft(tmp_path / "b", model, rank=2, layers=(3,), seed=1))
    both = _logits(model, ((a, 1.0), (b, -0.5)))
    assert np.abs(both - with_a).max() > 1e-3
    s = model.session(n_ctx=64)
    s.set_adapters([(a, 0.5), (b, 2.0)])
    assert [(x.n_matrices, sc) for x, sc in s.adapters] == [(4, 0.5), (2, 2.0)]
    s.set_adapters([])
    assert s.adapters == []


def test_snapshots_restore_adapters_and_sessions_are_independent(model, tmp_path):
    a = model.load_adapter(_write_peft(tmp_path / "a", model))
    s = model.session(n_ctx=64)
    s.set_adapters([(a, 1.0)])
    s.eval(PROMPT)
    data = s.save_state()
    r, _ = llama_core.Session.restore(model, data)
    assert [sc for _, sc in r.adapters] == [1.0]
    s.eval([42])
    r.eval([42])
    assert np.array_equal(s.logits(), r.logits())
    # Another load of the same file has no adapters loaded: restore refuses.
    other = llama_core.Model.load(model.path)
    with pytest.raises(llama_core.SessionStateError, match="not loaded"):
        llama_core.Session.restore(other, data)
    # Two threads, each with its own adapters, give what each gives alone.
    alone = {"a": _logits(model, [(a, 1.0)]), "base": _logits(model, [])}
    got = {}

    def run(name, adapters):
        got[name] = _logits(model, adapters)

    ts = [threading.Thread(target=run, args=("a", [(a, 1.0)])), threading.Thread(target=run, args=("base", []))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert np.array_equal(got["a"], alone["a"]) and np.array_equal(got["base"], alone["base"])


def test_bad_adapters_and_arguments(model, tmp_path, model_path):
    with pytest.raises(FileNotFoundError):
        model.load_adapter(tmp_path / "missing")
    with pytest.raises(llama_core.ModelLoadError, match="not a LoRA adapter"):
        model.load_adapter(model_path)
    bad = _write_peft(tmp_path / "dora", model)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(llama_core.ModelLoadError, match="DoRA"):
        model.load_adapter(bad)
    a = model.load_adapter(_write_peft(tmp_path / "a", model))
    s = model.session(n_ctx=64)
    with pytest.raises(llama_core.InvalidArgumentError, match="not finite"):
        s.set_adapters([(a, float("nan"))])
    with pytest.raises(TypeError):
        s.set_adapters([("not an adapter", 1.0)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        s.set_adapters(a)  # type: ignore[arg-type]
