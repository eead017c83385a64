"""Speculative decoding from Python: `draft=` (a Model or "lookup"), `prediction=` and
`draft_max=` leave every output exactly as without them, and count what they drafted."""

import pytest

import llama_core

TEXT = (
    "The river flows past the old mill, under the stone bridge, and on to the sea. "
    "Every spring the water rises and the meadows flood."
)
ASK = [{"role": "user", "content": f"Repeat this text exactly:\n\n{TEXT}"}]


def _chat(model, sampler, **kw):
    with model.session() as s:
        text = s.chat(ASK, max_tokens=40, sampler=sampler, **kw)
        return text, s.last_generation


@pytest.mark.parametrize("seeded", [False, True])
def test_every_draft_source_keeps_the_output(model, seeded):
    sampler = (lambda: llama_core.Sampler(temperature=0.7, seed=9)) if seeded else llama_core.Sampler.greedy
    plain, g = _chat(model, sampler())
    assert g["drafted_tokens"] == 0 and g["accepted_tokens"] == 0
    for kw in ({"draft": "lookup"}, {"prediction": TEXT, "draft_max": 4}, {"draft": model, "draft_max": 3}):
        text, g = _chat(model, sampler(), **kw)
        assert text == plain, kw
        assert 0 <= g["accepted_tokens"] <= g["drafted_tokens"], kw
        if not seeded:
            assert g["accepted_tokens"] > 0, kw


def test_streams_and_batches_keep_the_output(model):
    greedy = llama_core.Sampler.greedy()
    plain, _ = _chat(model, greedy)
    with model.session() as s:
        pieces = list(s.chat_stream(ASK, max_tokens=40, sampler=greedy, draft="lookup"))
    assert "".join(pieces) == plain
    b = llama_core.Batch(model)
    sid = b.add(ASK, max_tokens=40, sampler=greedy, prediction=TEXT)
    other = b.add("The capital of France is", max_tokens=12, sampler=greedy)
    while len(b):
        b.step()
    done = b.finished()
    assert done[sid]["text"] == plain
    assert done[sid]["accepted_tokens"] > 0
    with model.session() as s:
        assert done[other]["text"] == s.generate("The capital of France is", max_tokens=12, sampler=greedy)


def test_bad_speculation_arguments(model):
    with model.session() as s:
        with pytest.raises(TypeError, match="draft"):
            s.generate("Hi", max_tokens=2, draft=3)
        with pytest.raises(ValueError, match="lookup"):
            s.generate("Hi", max_tokens=2, draft="guess")
        with pytest.raises(TypeError, match="prediction"):
            s.generate("Hi", max_tokens=2, prediction=["a"])
        with pytest.raises(TypeError, match="draft_max"):
            s.generate("Hi", max_tokens=2, draft="lookup", draft_max="many")
        with pytest.raises(ValueError, match="at most one"):
            s.generate("Hi", max_tokens=2, draft="lookup", prediction="x")
