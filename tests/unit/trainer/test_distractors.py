"""In-batch distractors: each chunk's group filled with other samples' references, same kind first."""

import random

import pytest
import torch

from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.trainer.data import MemorySample, TrainingData
from memory3.services.trainer.train import batch_groups, memory_loss
from memory3.services.trainer.world import World


@pytest.fixture(scope="module")
def data():
    return TrainingData(World(3, n_train=60, n_heldout=30), TextCodec(byte_level_tokenizer()),
                        Memory3Config.from_name("tiny"), seq_len=256, seed=5)


def test_stage2_samples_name_the_entity_and_kind_of_each_reference(data):
    by_document = {}
    for index in range(8):
        sample = data.stage2(index)
        assert len(sample.reference_ids) == len(sample.reference_kinds) == len(sample.references)
        for tokens, entity_id, kind in zip(sample.references, sample.reference_ids, sample.reference_kinds,
                                           strict=True):
            text = data.codec.decode(tokens)
            assert f"({kind})" in text.split(":")[0]  # documents open with "Name (kind): ..."
            by_document.setdefault(entity_id, set()).add(text)
    assert all(len(texts) == 1 for texts in by_document.values())  # one id, one document


def test_without_an_rng_each_chunk_reads_its_own_group(data):
    samples = [data.stage2(i) for i in range(3)]
    groups = batch_groups(samples, 5)
    base = 0
    for sample, rows in zip(samples, groups, strict=True):
        assert rows == [[base + i for i in group] for group in sample.groups]
        base += len(sample.references)


def test_groups_are_filled_with_other_samples_references_same_kind_first(data):
    samples = [data.stage2(i, single_chunk=True) for i in range(40)]
    samples.append(MemorySample([0] * 65, [], [[]]))  # real text: reads nothing, lends nothing
    owner = [b for b, s in enumerate(samples) for _ in s.references]
    ids = [i for s in samples for i in s.reference_ids]
    kinds = [k for s in samples for k in s.reference_kinds]
    groups = batch_groups(samples, 5, random.Random(0))
    for b, (sample, rows) in enumerate(zip(samples, groups, strict=True)):
        if not sample.references:
            assert rows == [[]]
            continue
        (row,) = rows
        own = batch_groups(samples, 5)[b][0]
        assert row[: len(own)] == own and len(row) == 5
        distractors = row[len(own):]
        assert all(owner[j] != b for j in distractors) and len({ids[j] for j in row}) == 5
        same = [kinds[j] == kinds[own[0]] for j in distractors]
        available = sum(1 for j in range(len(ids)) if owner[j] != b and kinds[j] == kinds[own[0]])
        assert same == [True] * min(4, available) + [False] * (4 - min(4, available))
    assert groups == batch_groups(samples, 5, random.Random(0))  # a resumed run draws the same
    assert groups != batch_groups(samples, 5, random.Random(1))


def fake(ids, kinds, groups):
    return MemorySample([0] * 65, [[1]] * len(ids), groups, None, ids, kinds)


def test_full_groups_stay_as_they_are_and_a_group_never_reads_one_entity_twice():
    batch = [
        fake(["a", "b", "c", "d", "e"], ["person"] * 5, [[0], [1, 0], [4, 3, 2, 1, 0]]),
        fake(["a", "f"], ["person", "city"], [[0], [1, 0]]),  # "a" again: the same entity in two samples
        fake(["g", "h"], ["person", "person"], [[0], [1]]),
        fake(["i", "j"], ["organisation", "person"], [[0], [1]]),
    ]
    ids = [i for s in batch for i in s.reference_ids]
    groups = batch_groups(batch, 5, random.Random(3))
    assert groups[0][2] == [4, 3, 2, 1, 0]  # already full
    for rows in groups:
        for row in rows:
            assert len(row) == 5 and len({ids[j] for j in row}) == 5
    assert all(ids[j] != "a" for j in groups[0][0][1:])


def test_distractors_need_reference_ids_and_kinds(data):
    sample = data.stage2(0)
    bare = MemorySample(sample.tokens, sample.references, sample.groups)
    with pytest.raises(ValueError, match="reference_ids"):
        batch_groups([bare, data.stage2(1)], 5, random.Random(0))


def test_memory_loss_reads_the_groups_it_is_given(data):
    config = Memory3Config.from_name("tiny")
    model = random_model(config, seed=1)
    prefix = data.codec.reference_prefix(config)
    samples = [data.stage2(i, single_chunk=True) for i in range(6)]
    with torch.no_grad():
        own = memory_loss(model, samples, prefix)
        torch.testing.assert_close(memory_loss(model, samples, prefix, groups=batch_groups(samples, 5)), own)
        filled = memory_loss(model, samples, prefix, groups=batch_groups(samples, 5, random.Random(0)))
    assert torch.isfinite(filled) and not torch.isclose(filled, own)
