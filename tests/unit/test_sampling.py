import pytest
import torch

from memory3.model.generate import SamplingParams, generate, logit_bias_row, penalize, sample
from memory3.model.layout import rope_positions


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


def test_penalties_count_each_rows_generated_tokens_and_the_bias_adds():
    logits = torch.zeros(2, 10)
    counts = torch.zeros(2, 10)
    counts[0, 3], counts[0, 5], counts[1, 7] = 2, 1, 3  # row 0 generated 3, 3, 5; row 1 7, 7, 7
    bias = torch.stack([logit_bias_row(SamplingParams(logit_bias=((7, 2.0),)), 10),
                        logit_bias_row(SamplingParams(), 10)])
    got = penalize(logits, counts, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.25]), bias)
    expected = torch.zeros(2, 10)
    expected[0, 3], expected[0, 5], expected[0, 7] = -(2 * 0.5 + 1.0), -(0.5 + 1.0), 2.0
    expected[1, 7] = -3 * 0.25  # each row its own penalties
    assert torch.equal(got, expected)
    assert torch.equal(logits, torch.zeros(2, 10))  # the caller's logits are left as they were
    with pytest.raises(ValueError, match="token id 10 is outside the model's 10 ids"):
        logit_bias_row(SamplingParams(logit_bias=((10, 1.0),)), 10)


def test_a_logit_bias_bans_or_forces_a_token_even_when_greedy():
    logits = torch.randn(3, 20)
    best = logits.argmax(-1)
    none = torch.zeros(3)

    def biased(params):
        return penalize(logits, torch.zeros(3, 20), none, none, logit_bias_row(params, 20)[None])

    banned = SamplingParams(logit_bias=((int(best[0]), -100.0),))
    assert int(sample(biased(banned), banned)[0]) != int(best[0])
    forced = SamplingParams(temperature=1.0, logit_bias=((4, 100.0),))
    gen = torch.Generator().manual_seed(0)
    assert sample(biased(forced), forced, gen).tolist() == [4, 4, 4]


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2.0, 2.0\]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be in"),
    ({"logit_bias": ((5, 101.0),)}, "a bias is in"),
    ({"logit_bias": ((-1, 1.0),)}, "token ids are integers >= 0"),
    ({"logit_bias": ((5, 1.0), (5, 2.0))}, "given twice"),
])
def test_bad_penalties_and_biases_say_what_to_fix(kwargs, says):
    with pytest.raises(ValueError, match=says):
        SamplingParams(**kwargs)


def test_generate_penalizes_what_it_generated_as_a_step_by_step_reference_does(tiny_model):
    """Greedy with penalties and a bias, against the whole sequence's logits adjusted by hand each step."""
    body, steps = [1, 5, 6, 7, 8], 16
    params = SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, logit_bias=((9, 1.0),), vocab_limit=259)
    with torch.inference_mode():
        got = generate(tiny_model, [body], max_new_tokens=steps, sampling=params).tokens[0]
        plain = generate(tiny_model, [body], max_new_tokens=steps, sampling=SamplingParams(vocab_limit=259)).tokens[0]
        tokens, expected = list(body), []
        for _ in range(steps):
            positions = rope_positions(torch.arange(len(tokens))[None], 0, tiny_model.config.ref_len)
            logits = tiny_model(torch.tensor([tokens]), positions)[0, -1, :259].clone()
            for t in set(expected):
                logits[t] -= 1.5 * expected.count(t) + 0.5
            logits[9] += 1.0
            expected.append(int(logits.argmax()))
            tokens.append(expected[-1])
    assert got == expected
    assert got != plain  # the penalties changed what was generated
