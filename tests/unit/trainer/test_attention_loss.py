"""Supervised memory attention: the answer tokens' share of memory attention on their own memory."""

import random

import pytest
import torch

from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.trainer.data import MemorySample, TrainingData
from memory3.services.trainer.train import answer_targets, batch_groups, memory_loss, supervised_layers
from memory3.services.trainer.world import World

CONFIG = Memory3Config.from_name("tiny")


@pytest.fixture(scope="module")
def data():
    return TrainingData(World(3, n_train=60, n_heldout=30), TextCodec(byte_level_tokenizer()), CONFIG,
                        seq_len=256, seed=5)


def test_answer_references_point_at_the_reference_that_holds_the_answer(data):
    marked = 0
    for index in range(12):
        sample = data.stage2(index, single_chunk=index % 2 == 0)
        refs = sample.answer_references
        assert len(refs) == len(sample.tokens) - 1
        t = 0
        while t < len(refs):
            if refs[t] < 0:
                t += 1
                continue
            end = t
            while end < len(refs) and refs[end] == refs[t]:
                end += 1
            assert all(w == data.answer_weight for w in sample.weights[t:end])
            answer = data.codec.decode(sample.tokens[t + 1 : end + 1]).strip()
            if end < len(refs):  # an answer cut by the sample's end may stop mid-token
                assert answer and answer in data.codec.decode(sample.references[refs[t]])
            marked += end - t
            t = end
    assert marked > 0


def test_answer_targets_find_the_answer_memory_in_its_chunks_group(data):
    samples = [data.stage2(i) for i in range(4)]
    groups = batch_groups(samples, 5, random.Random(0))
    targets = answer_targets(samples, groups, CONFIG.chunk_len)
    bases = [0]
    for s in samples:
        bases.append(bases[-1] + len(s.references))
    assert len(targets) > 0
    for b, t, g, j in zip(*(x.tolist() for x in (targets.sample, targets.position, targets.group,
                                                  targets.member)), strict=True):
        assert g == t // CONFIG.chunk_len
        assert groups[b][g][j] == bases[b] + samples[b].answer_references[t]


def _one_reference_sample(data) -> MemorySample:
    sample = next(s for i in range(20) if (s := data.stage2(i, single_chunk=True)).references
                  and any(r == 0 for r in s.answer_references))
    return MemorySample(sample.tokens, sample.references[:1], [[0]], sample.weights,
                        sample.reference_ids[:1], sample.reference_kinds[:1],
                        [r if r == 0 else -1 for r in sample.answer_references])


def test_attention_loss_is_the_log_of_the_group_size_when_memories_are_alike(data):
    """Five copies of the answer's memory share attention equally: -log(1/5); one alone adds no term."""
    model = random_model(CONFIG, seed=1)
    prefix = data.codec.reference_prefix(CONFIG)
    sample = _one_reference_sample(data)
    copies = MemorySample(sample.tokens, sample.references * 5, [[0, 1, 2, 3, 4]], sample.weights,
                          sample.reference_ids * 5, sample.reference_kinds * 5, sample.answer_references)
    with torch.no_grad():
        alike, alone = {}, {}
        memory_loss(model, [copies], prefix, attention_weight=1.0, parts=alike)
        memory_loss(model, [sample], prefix, attention_weight=1.0, parts=alone)
    assert alike["attention"] == pytest.approx(torch.log(torch.tensor(5.0)).item(), abs=1e-4)
    assert "attention" not in alone and "lm" in alone  # nothing to tell apart: no term


def test_attention_loss_is_added_to_the_language_model_loss_with_its_weight(data):
    model = random_model(CONFIG, seed=2)
    prefix = data.codec.reference_prefix(CONFIG)
    samples = [data.stage2(i, single_chunk=True) for i in range(8)]
    groups = batch_groups(samples, 5, random.Random(1))
    with torch.no_grad():
        parts = {}
        total = memory_loss(model, samples, prefix, groups=groups, attention_weight=0.5, parts=parts)
        plain = memory_loss(model, samples, prefix, groups=groups)
    assert parts["attention"] > 0.5  # near log 5 for a random model
    torch.testing.assert_close(plain, torch.tensor(parts["lm"]), atol=1e-5, rtol=0)
    assert float(total) == pytest.approx(parts["lm"] + 0.5 * parts["attention"], abs=1e-4)


def test_training_on_the_attention_loss_moves_attention_to_the_answer_memory(data):
    torch.manual_seed(0)
    model = random_model(CONFIG, seed=3)
    prefix = data.codec.reference_prefix(CONFIG)
    samples = [data.stage2(i, single_chunk=True) for i in range(8)]
    groups = batch_groups(samples, 5, random.Random(2))
    params = [p for layer in (model.layers[i] for i in CONFIG.memory_layers if i > 0) for p in layer.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    history = []
    for _ in range(30):
        parts = {}
        loss = memory_loss(model, samples, prefix, groups=groups, attention_weight=1.0, parts=parts)
        (loss - parts["lm"]).backward()  # the attention term alone
        optimizer.step()
        optimizer.zero_grad()
        history.append(parts["attention"])
    assert history[-1] < 0.5 * history[0]


def test_memory_layer_zero_is_not_supervised():
    assert supervised_layers(CONFIG) == [1]
    assert supervised_layers(Memory3Config.from_name("small")) == [1, 2, 3]
