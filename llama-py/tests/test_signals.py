"""Ctrl-C (SIGINT) interrupts long native calls within half a second, and the session stays usable."""
import signal
import threading
import time

import pytest

import llama_core


def _no_eog_sampler(model):
    # Only the interrupt (or the context) can end the generation.
    return llama_core.Sampler(temperature=1.0, seed=3, logit_bias={t: float("-inf") for t in model.eog_ids})


def _interrupt_after(seconds):
    sent = {}

    def fire():
        sent["at"] = time.perf_counter()
        signal.raise_signal(signal.SIGINT)

    timer = threading.Timer(seconds, fire)
    timer.start()
    return timer, sent


def test_ctrl_c_stops_generate_and_the_session_generates_again(model):
    s = model.session(n_ctx=4096)
    timer, sent = _interrupt_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        s.generate("Once upon a time", max_tokens=100000, sampler=_no_eog_sampler(model))
    raised = time.perf_counter()
    timer.join()
    assert raised - sent["at"] < 0.5, raised - sent["at"]
    kept = s.last_generation
    assert kept is not None and 0 < len(kept["tokens"]) < 100000
    assert len(s) > 0
    out = s.generate(" The end.", max_tokens=4, sampler=llama_core.Sampler.greedy())
    assert isinstance(out, str) and s.last_generation["generated_tokens"] == 4


def test_ctrl_c_stops_a_stream_and_a_long_prompt(model):
    s = model.session(n_ctx=4096)
    timer, sent = _interrupt_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        for _ in s.stream("Tell me a story.", max_tokens=100000, sampler=_no_eog_sampler(model)):
            pass
    raised = time.perf_counter()
    timer.join()
    assert raised - sent["at"] < 0.5, raised - sent["at"]
    # A long prompt is interrupted between layers and leaves the session as it was.
    t = model.session(n_ctx=4096)
    prompt = list(range(100, 100 + 3000))
    timer, sent = _interrupt_after(0.2)
    with pytest.raises(KeyboardInterrupt):
        t.eval(prompt)
    raised = time.perf_counter()
    timer.join()
    assert raised - sent["at"] < 0.5, raised - sent["at"]
    assert len(t) % 512 == 0 and len(t) < 3000
    t.eval([1, 2, 3])
    assert t.logits() is not None


def test_ctrl_c_stops_embed_and_embed_works_again(model):
    text = " ".join(f"word{i}" for i in range(3000))
    timer, sent = _interrupt_after(0.2)
    with pytest.raises(KeyboardInterrupt):
        model.embed(text)
    raised = time.perf_counter()
    timer.join()
    assert raised - sent["at"] < 0.5, raised - sent["at"]
    v = model.embed("hello there")
    assert v.shape == (model.n_embd,)
