"""Ctrl-C (SIGINT) interrupts long native calls within half a second, and the session stays usable."""
import signal
import threading
import time

import pytest

import llama_core


def _no_eog_sampler(model):
    # Only the interrupt (or the context) can end the generation.
    return llama_core.Sampler(temperature=1.0, seed=3, logit_bias={t: float("-inf") for t in model.eog_ids})


def _interrupted(after, call):
    """Runs `call` with SIGINT raised `after` seconds in: it must raise KeyboardInterrupt within
    half a second of the signal."""
    sent = {}

    def fire():
        sent["at"] = time.perf_counter()
        signal.raise_signal(signal.SIGINT)

    timer = threading.Timer(after, fire)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        call()
    raised = time.perf_counter()
    timer.join()
    assert raised - sent["at"] < 0.5, raised - sent["at"]


def test_ctrl_c_stops_generate_and_the_session_generates_again(model):
    s = model.session(n_ctx=4096)
    _interrupted(0.3, lambda: s.generate("Once upon a time", max_tokens=100000, sampler=_no_eog_sampler(model)))
    kept = s.last_generation
    assert kept is not None and 0 < len(kept["tokens"]) < 100000
    assert len(s) > 0
    out = s.generate(" The end.", max_tokens=4, sampler=llama_core.Sampler.greedy())
    assert isinstance(out, str) and s.last_generation["generated_tokens"] == 4


def test_ctrl_c_stops_a_stream_and_a_long_prompt(model):
    s = model.session(n_ctx=4096)

    def drain():
        for _ in s.stream("Tell me a story.", max_tokens=100000, sampler=_no_eog_sampler(model)):
            pass

    _interrupted(0.3, drain)
    # A long prompt is interrupted between layers and leaves the session as it was.
    t = model.session(n_ctx=4096)
    _interrupted(0.2, lambda: t.eval(list(range(100, 100 + 3000))))
    assert len(t) % 512 == 0 and len(t) < 3000
    t.eval([1, 2, 3])
    assert t.logits() is not None


def test_ctrl_c_stops_embed_and_embed_works_again(model):
    text = " ".join(f"word{i}" for i in range(3000))
    _interrupted(0.2, lambda: model.embed(text))
    v = model.embed("hello there")
    assert v.shape == (model.n_embd,)
