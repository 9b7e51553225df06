"""Supervised memory attention: the answer tokens' share of memory attention on the slots of their
own memory that hold the token they predict."""

import dataclasses
import math
import random

import pytest
import torch

from memory3.model.config import Memory3Config
from memory3.model.encoder import encode_batch
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.trainer.data import MemorySample, TrainingData
from memory3.services.trainer.train import (
    answer_slots,
    answer_targets,
    batch_groups,
    memory_loss,
    supervised_layers,
)
from memory3.services.trainer.world import World

CONFIG = Memory3Config.from_name("tiny")
# Every token kept: the loss rewards the slots holding the answer's token, which a random model's
# top-k would keep only by chance.
ALL_KEPT = dataclasses.replace(CONFIG, mem_tokens_per_head=CONFIG.ref_len)


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


def test_answer_slots_hold_the_token_each_answer_target_predicts(data):
    model = random_model(CONFIG, seed=4)
    prefix = data.codec.reference_prefix(CONFIG)
    samples = [data.stage2(i, single_chunk=True) for i in range(8)]
    groups = batch_groups(samples, 5, random.Random(3))
    refs = [r for s in samples for r in s.references]
    index = torch.full((len(samples), 1, 5), -1, dtype=torch.long)
    for b, row in enumerate(groups):
        index[b, 0, : len(row[0])] = torch.tensor(row[0])
    targets = answer_targets(samples, groups, CONFIG.chunk_len)
    next_tokens = torch.tensor([s.tokens[1:] for s in samples])
    with torch.no_grad():
        _, _, positions = encode_batch(model, refs, prefix)
    held = answer_slots(refs, positions, index, targets, next_tokens)
    assert held.shape == (len(targets), *positions.shape[1:])
    found = 0
    for n, (b, t, j) in enumerate(zip(targets.sample.tolist(), targets.position.tolist(), targets.member.tolist(),
                                      strict=True)):
        ref = refs[groups[b][0][j]]
        pos = positions[groups[b][0][j]]
        for slot in zip(*torch.nonzero(pos >= 0, as_tuple=True), strict=True):
            holds = ref[pos[slot]] == samples[b].tokens[t + 1]
            assert bool(held[n][slot]) == holds
            found += holds
        assert not held[n][pos < 0].any()
    assert found > 0


def test_attention_loss_grows_by_the_log_of_the_group_size_when_memories_are_alike(data):
    """n copies of the answer's memory share its attention equally, so the share on the answer's
    slots of one copy is 1/n of what one memory alone would get: the loss grows by log n."""
    model = random_model(ALL_KEPT, seed=1)
    prefix = data.codec.reference_prefix(CONFIG)
    sample = _one_reference_sample(data)
    losses = {}
    for n in (2, 5):
        copies = MemorySample(sample.tokens, sample.references * n, [list(range(n))], sample.weights,
                              sample.reference_ids * n, sample.reference_kinds * n, sample.answer_references)
        parts = {}
        with torch.no_grad():
            memory_loss(model, [copies], prefix, attention_weight=1.0, parts=parts)
        losses[n] = parts["attention"]
    with torch.no_grad():
        alone = {}
        memory_loss(model, [sample], prefix, attention_weight=1.0, parts=alone)
    assert losses[2] > 0
    assert losses[5] - losses[2] == pytest.approx(math.log(5 / 2), abs=1e-4)
    assert "attention" not in alone and "lm" in alone  # nothing to tell apart: no term


def test_attention_loss_is_added_to_the_language_model_loss_with_its_weight(data):
    model = random_model(ALL_KEPT, seed=2)
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
    model = random_model(ALL_KEPT, seed=3)
    prefix = data.codec.reference_prefix(CONFIG)
    samples = [data.stage2(i, single_chunk=True) for i in range(8)]
    groups = batch_groups(samples, 5, random.Random(2))
    params = [p for layer in (model.layers[i] for i in ALL_KEPT.memory_layers if i > 0) for p in layer.parameters()]
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


def test_targets_whose_token_no_head_kept_add_nothing_and_no_nan(data, monkeypatch):
    from memory3.services.trainer import train

    model = random_model(ALL_KEPT, seed=5)
    prefix = data.codec.reference_prefix(ALL_KEPT)
    samples = [data.stage2(i, single_chunk=True) for i in range(8)]
    groups = batch_groups(samples, 5, random.Random(4))
    real = train.answer_slots
    kept_only_first = []

    def first_target_only(*args):
        held = real(*args).clone()
        held[1:] = False  # every other target: its token kept by no head
        kept_only_first.append(held)
        return held

    monkeypatch.setattr(train, "answer_slots", first_target_only)
    parts = {}
    loss = memory_loss(model, samples, prefix, groups=groups, attention_weight=1.0, parts=parts)
    loss.backward()
    assert len(kept_only_first) == 1 and kept_only_first[0].shape[0] > 1
    assert 0 < parts["attention"] < float("inf")
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
