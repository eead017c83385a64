import numpy as np
import pytest

import llama_core


def test_greedy_sample_is_argmax(model):
    with model.session() as s:
        s.eval(model.tokenize("The capital of France is"))
        assert llama_core.Sampler.greedy().sample(s) == int(np.argmax(s.logits()))


def test_seeded_sampling_is_reproducible(model):
    def run(seed):
        with model.session() as s:
            return s.generate("Once upon a time", max_tokens=16, sampler=llama_core.Sampler(seed=seed))

    assert run(11) == run(11)


def test_repr_and_logit_bias(model):
    smp = llama_core.Sampler(temperature=0.0, logit_bias={42: 100.0})
    assert "temperature=0" in repr(smp)
    with model.session() as s:
        s.eval(model.tokenize("Hello"))
        assert smp.sample(s) == 42


@pytest.mark.parametrize("kw", [{"top_k": 0}, {"min_p": 0.0}, {"repeat_penalty": 1.3, "repeat_last_n": -1}])
def test_parameter_variants(model, kw):
    with model.session() as s:
        out = s.generate("Hello", max_tokens=4, sampler=llama_core.Sampler(seed=1, **kw))
        assert isinstance(out, str)
