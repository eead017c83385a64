"""Batched generation: Model.generate_batch and the continuous Batch object give each prompt
exactly what it gets alone."""

import pytest

import llama_core

QUESTIONS = [
    [{"role": "user", "content": "Name three rivers in Europe."}],
    [{"role": "user", "content": "What is 12 times 7?"}],
    "The capital of France is",
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


def _alone(model, prompt, sampler, **kw):
    with model.session() as s:
        if isinstance(prompt, str):
            return s.generate(prompt, sampler=sampler, **kw)
        return s.chat(prompt, sampler=sampler, **kw)


def test_generate_batch_equals_each_alone(model):
    got = model.generate_batch(QUESTIONS, max_tokens=24, sampler=llama_core.Sampler.greedy())
    want = [_alone(model, q, llama_core.Sampler.greedy(), max_tokens=24) for q in QUESTIONS]
    assert got == want
    # A seeded sampler: every sequence draws from its own copy.
    got = model.generate_batch(QUESTIONS[:2], max_tokens=16, sampler=llama_core.Sampler(temperature=0.9, seed=5))
    want = [_alone(model, q, llama_core.Sampler(temperature=0.9, seed=5), max_tokens=16) for q in QUESTIONS[:2]]
    assert got == want
    # Constraints apply to every sequence.
    got = model.generate_batch(QUESTIONS[:3], choices=["yes", "no"], sampler=llama_core.Sampler.greedy())
    assert all(g in ("yes", "no") for g in got)


def test_continuous_batch_streams_and_finishes(model):
    b = llama_core.Batch(model)
    greedy = llama_core.Sampler.greedy()
    ids = [b.add(QUESTIONS[0], max_tokens=20, sampler=greedy)]
    texts = {}
    steps = 0
    while len(b):
        if steps == 2:
            ids.append(b.add(QUESTIONS[1], max_tokens=12, sampler=greedy))
            victim = b.add(QUESTIONS[3], max_tokens=50, sampler=greedy)
        if steps == 5:
            assert b.cancel(victim)
        for sid, text in b.step():
            texts[sid] = texts.get(sid, "") + text
        steps += 1
    done = b.finished()
    assert set(done) == set(ids) | {victim}
    assert done[victim]["stop_reason"] == "cancelled"
    assert done[ids[0]]["text"] == _alone(model, QUESTIONS[0], greedy, max_tokens=20)
    assert done[ids[1]]["text"] == _alone(model, QUESTIONS[1], greedy, max_tokens=12)
    assert texts[ids[0]] == done[ids[0]]["text"]
    assert not b.cancel(victim)
    assert b.finished() == {}


def test_bad_batch_input(model):
    with pytest.raises(ValueError):
        model.generate_batch([42])
    with pytest.raises(ValueError):
        model.generate_batch("not a list of prompts, a str")
    b = llama_core.Batch(model)
    with pytest.raises(llama_core.ConstraintError):
        b.add("hi", regex="(")
    with pytest.raises(llama_core.ContextOverflowError):
        b.add("word " * 100, n_ctx=16)
    assert len(b) == 0
    assert model.generate_batch([]) == []
