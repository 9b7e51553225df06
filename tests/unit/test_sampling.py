import pytest
import torch

from memory3.model.generate import SamplingParams, generate, sample


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, SamplingParams(temperature=1.0, top_k=1), gen), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature=1.0, top_p=1e-6), gen), logits.argmax(-1))


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.randn(2, 30)
    best = logits.topk(3, dim=-1).indices
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        picked = sample(logits, SamplingParams(temperature=2.0, top_k=3), gen)
        assert all(int(picked[b]) in best[b].tolist() for b in range(2))


def test_seeded_sampling_is_reproducible(tiny_model):
    prompt = [[1, 5, 6, 7, 8]]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    with torch.no_grad():
        a = generate(tiny_model, prompt, max_new_tokens=16, sampling=params)
        b = generate(tiny_model, prompt, max_new_tokens=16, sampling=params)
        c = generate(tiny_model, prompt, max_new_tokens=16, sampling=SamplingParams(temperature=1.0, seed=124))
    assert a.tokens == b.tokens and a.tokens != c.tokens


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_parameters(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_vocab_limit_never_samples_padding_ids():
    logits = torch.zeros(3, 40)
    logits[:, 30:] = 100.0  # padding ids would win
    gen = torch.Generator().manual_seed(0)
    assert (sample(logits, SamplingParams(vocab_limit=30)) < 30).all()
    for _ in range(50):
        assert (sample(logits, SamplingParams(temperature=1.0, vocab_limit=30), gen) < 30).all()
