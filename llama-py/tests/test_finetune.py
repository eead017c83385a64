"""Training a LoRA adapter from Python: the returned adapter applies to sessions, the files are
written, progress callbacks see every step, and bad data raises a clear error."""
import json

import pytest

import llama_core


def _data(path, n=6):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Code {i}:", "completion": f" Z{i % 3}Q"}) + "\n")
    return path


def test_finetune_returns_an_adapter_and_writes_both_formats(model, tmp_path):
    data = _data(tmp_path / "train.jsonl")
    seen = []

    def cb(report):
        seen.append(report)

    a = llama_core.finetune(model, data, out=tmp_path / "out", eval=data, eval_every=2, rank=2,
                            lr=1e-3, targets=["q", "v"], epochs=1, seed=3, progress=cb)
    assert isinstance(a, llama_core.Adapter) and a.targets == ["q", "v"] and a.max_rank == 2
    assert [r["step"] for r in seen] == list(range(1, 7)) and seen[-1]["total_steps"] == 6
    assert all(r["loss"] > 0 for r in seen) and "eval_loss" in seen[1]
    # The core's recipe: evaluation every eval_every steps and after the last, not between.
    assert [("eval_loss" in r) for r in seen] == [False, True, False, True, False, True]
    for f in ("adapter_config.json", "adapter_model.safetensors", "adapter.gguf",
              "checkpoint/trainer_state.json"):
        assert (tmp_path / "out" / f).is_file()
    # The returned adapter and the written files give the same logits.
    outs = []
    for adapter in (a, model.load_adapter(tmp_path / "out"), model.load_adapter(tmp_path / "out" / "adapter.gguf")):
        s = model.session(n_ctx=64)
        s.set_adapters([(adapter, 1.0)])
        s.eval([1, 2, 3, 4])
        outs.append(s.logits())
    assert abs(outs[0] - outs[1]).max() < 1e-4 and abs(outs[0] - outs[2]).max() < 1e-4
    # A callback returning False stops early.
    stopped = []
    llama_core.finetune(model, data, rank=2, progress=lambda r: stopped.append(r["step"]) or len(stopped) < 2)
    assert stopped == [1, 2]


def test_finetune_errors(model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"oops": 1}\n')
    with pytest.raises(llama_core.InvalidArgumentError, match=":2:"):
        llama_core.finetune(model, bad, progress=False)
    with pytest.raises(FileNotFoundError):
        llama_core.finetune(model, tmp_path / "missing.jsonl", progress=False)
    with pytest.raises(llama_core.InvalidArgumentError, match="unknown LoRA target"):
        llama_core.finetune(model, _data(tmp_path / "d.jsonl"), targets=["qq"], progress=False)
    with pytest.raises(llama_core.InvalidArgumentError):
        llama_core.finetune(model, _data(tmp_path / "d.jsonl"), rank=0, progress=False)
