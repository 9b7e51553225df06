import random

import pytest
import torch

from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.trainer.data import MemorySample, TrainingData
from memory3.services.trainer.train import memory_loss
from memory3.services.trainer.world import World


@pytest.fixture(scope="module")
def world():
    return World(3, n_train=60, n_heldout=30)


@pytest.fixture(scope="module")
def codec():
    return TextCodec(byte_level_tokenizer())


def make_data(world, codec, **kwargs):
    config = Memory3Config.from_name("tiny")
    return TrainingData(world, codec, config, seq_len=128, seed=5, **kwargs)


def world_names(world):
    return {e.name for e in world.entities} | set(world.cities) | set(world.organisations)


def test_fresh_entities_never_collide_with_world_names_and_leave_the_world_unchanged(world):
    taken = world_names(world)
    before = [(e.id, e.name, e.document) for e in world.entities]
    rng = random.Random(0)
    fresh = [world.fresh_entity(rng, f"fresh-{i}") for i in range(3000)]
    assert not {e.name for e in fresh} & taken
    assert {e.split for e in fresh} == {"fresh"}
    assert {e.kind for e in fresh} == {"person", "city", "organisation", "product"}
    assert [(e.id, e.name, e.document) for e in world.entities] == before
    pools = {v for values in world.answer_pools().values() for v in values}
    for e in fresh[:200]:
        for fact in e.facts:
            assert fact.answer in e.document and (fact.answer in pools or fact.answer.isdigit())


def test_fresh_entity_is_a_function_of_the_rng_state(world):
    a = [world.fresh_entity(random.Random("x"), "e").document for _ in range(2)]
    b = world.fresh_entity(random.Random("y"), "e").document
    assert a[0] == a[1] != b


def test_stage2_is_a_pure_function_of_the_index(world, codec):
    one, two = make_data(world, codec, answer_weight=3.0), make_data(world, codec, answer_weight=3.0)
    forward = [one.stage2(i) for i in range(6)]
    backward = [two.stage2(i) for i in reversed(range(6))][::-1]
    assert forward == backward
    assert forward[0].tokens != forward[1].tokens


def test_stage2_asks_about_fresh_entities_only_by_default(world, codec):
    data = make_data(world, codec)
    known = {e.name for e in world.entities}
    for i in range(5):
        text = codec.decode(data.stage2(i).tokens)
        assert not any(name in text for name in known)
    mixed = make_data(world, codec, fresh_fraction=0.0)
    train_names = {e.name for e in world.split("train")}
    assert any(name in codec.decode(mixed.stage2(0).tokens) for name in train_names)


def test_stage2_never_asks_about_heldout_entities(world, codec):
    heldout = {e.name for e in world.split("heldout")}
    for fraction in (1.0, 0.5, 0.0):
        data = make_data(world, codec, fresh_fraction=fraction)
        for i in range(10):
            text = codec.decode(data.stage2(i).tokens)
            assert not any(name in text for name in heldout)


def test_answer_tokens_carry_the_answer_weight(world, codec):
    data = make_data(world, codec, answer_weight=4.0)
    sample = data.stage2(0)
    assert len(sample.weights) == len(sample.tokens) - 1 == data.seq_len
    assert set(sample.weights) == {1.0, 4.0}
    targets = sample.tokens[1:]
    # Contiguous runs of weighted targets are exactly " <answer>\n" after "Answer: <cue>".
    runs, current = [], []
    for token, weight in zip(targets, sample.weights, strict=True):
        if weight == 4.0:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    text = codec.decode(sample.tokens)
    answers = [line.split(" ", 2)[2] for line in text.split("\n") if line.startswith("Answer: ")]
    assert [codec.decode(r) for r in runs] == [f" {a}\n" for a in answers[: len(runs)]]
    assert len(runs) >= len(answers) - 1  # the last pair may be cut by seq_len


def test_single_chunk_samples_read_only_their_own_reference(world, codec):
    data = TrainingData(world, codec, Memory3Config.from_name("tiny"), seq_len=512, seed=5, answer_weight=5.0)
    for index in range(10):
        single = data.stage2(index, single_chunk=True)
        assert len(single.tokens) == 64 + 1 and len(single.weights) == 64
        assert len(single.groups) == 1 and len(single.groups[0]) == 1
        assert len(single.references) == 1
    # Keyed apart from full-length samples: not the first chunk of the same-index long sample.
    assert data.stage2(0, single_chunk=True).tokens != data.stage2(0).tokens[: 64 + 1]
    long = [data.stage2(index) for index in range(5)]
    assert all(len(s.groups) == 512 // 64 for s in long)
    assert any(len(group) > 1 for s in long for group in s.groups)  # the previous chunks' too


REAL = ["The quick brown fox jumps over the lazy dog.", "A dictionary lists the words of a language."]


def test_stage2_mixes_in_real_text_that_reads_no_memory(world, codec):
    data = make_data(world, codec, real_text=REAL, stage2_real_fraction=0.5)
    samples = [data.stage2(i, single_chunk=single) for i in range(40) for single in (False, True)]
    real = [s for s in samples if not s.references]
    assert 0.3 < len(real) / len(samples) < 0.7
    for s in real:
        assert all(group == [] for group in s.groups) and s.weights is None
        assert len(s.groups) == (len(s.tokens) - 1) // 64
        *whole, last = codec.decode(s.tokens[1:]).split("\n\n")
        assert set(whole) <= set(REAL) and any(doc.startswith(last) for doc in REAL)
    assert all(s.references and s.weights for s in samples if s not in real)
    assert [data.stage2(i) for i in range(6)] == [make_data(world, codec, real_text=REAL,
                                                            stage2_real_fraction=0.5).stage2(i) for i in range(6)]
    for off in (make_data(world, codec, real_text=REAL), make_data(world, codec, stage2_real_fraction=0.5)):
        assert all(off.stage2(i).references for i in range(20))
    with pytest.raises(ValueError, match="stage2_real_fraction"):
        make_data(world, codec, real_text=REAL, stage2_real_fraction=1.5)


def test_memory_loss_on_samples_that_read_no_memory(world, codec):
    config = Memory3Config.from_name("tiny")
    model = random_model(config, seed=1)
    data = make_data(world, codec, real_text=REAL, stage2_real_fraction=1.0)
    samples = [data.stage2(i) for i in range(3)]
    assert not any(s.references for s in samples)
    with torch.no_grad():
        loss = memory_loss(model, samples, codec.reference_prefix(config))
    assert torch.isfinite(loss) and loss.item() > 0


def test_stage1_copies_from_fresh_documents_and_never_shows_heldout_entities(world, codec):
    data = make_data(world, codec, real_text=["Some real text."])
    heldout = {e.name for e in world.split("heldout")}
    texts = [codec.decode(data.stage1(i)) for i in range(40)]
    assert not any(name in text for text in texts for name in heldout)
    fresh_docs = [line for text in texts for line in text.split("\n") if "): " in line]
    assert fresh_docs and not any(e.document in fresh_docs for e in world.entities)


def test_memory_loss_weights_the_targets(world, codec):
    torch.manual_seed(0)
    config = Memory3Config.from_name("tiny")
    model = random_model(config, seed=1)
    prefix = codec.reference_prefix(config)
    sample = make_data(world, codec, answer_weight=4.0).stage2(0)
    unweighted = MemorySample(sample.tokens, sample.references, sample.groups)
    uniform = MemorySample(sample.tokens, sample.references, sample.groups, [1.0] * len(sample.weights))
    with torch.no_grad():
        plain = memory_loss(model, [unweighted], prefix)
        torch.testing.assert_close(memory_loss(model, [uniform], prefix), plain)
        weighted = memory_loss(model, [sample], prefix)
        # The same logits, reweighted by hand.
        doubled = MemorySample(sample.tokens, sample.references, sample.groups, [2 * w for w in sample.weights])
        torch.testing.assert_close(memory_loss(model, [doubled], prefix), weighted)
        w = torch.tensor(sample.weights)
        only_answers = MemorySample(sample.tokens, sample.references, sample.groups,
                                    [1.0 if x > 1 else 1e-12 for x in sample.weights])
        on_answers = memory_loss(model, [only_answers], prefix)
        on_rest = memory_loss(model, [MemorySample(sample.tokens, sample.references, sample.groups,
                                                   [1e-12 if x > 1 else 1.0 for x in sample.weights])], prefix)
        n_answer, n_rest = int((w > 1).sum()), int((w == 1).sum())
        expected = (4.0 * n_answer * on_answers + n_rest * on_rest) / (4.0 * n_answer + n_rest)
        torch.testing.assert_close(weighted, expected, rtol=1e-4, atol=1e-5)


def test_bad_data_settings(world, codec):
    with pytest.raises(ValueError):
        make_data(world, codec, fresh_fraction=1.5)
    with pytest.raises(ValueError):
        make_data(world, codec, answer_weight=0.0)


def test_own_reference_steps_are_the_first_part_of_stage2():
    from memory3.services.trainer.train import StageConfig, TrainConfig

    config = TrainConfig(batch_size=4, stage1=StageConfig(steps=10, lr=1e-3), stage2=StageConfig(steps=100, lr=1e-3),
                         own_reference_fraction=0.3)
    assert config.own_reference_steps == 30
    with pytest.raises(ValueError, match="own_reference_fraction"):
        TrainConfig(own_reference_fraction=1.5)
    with pytest.raises(ValueError, match="stage2_real_fraction"):
        TrainConfig(stage2_real_fraction=-0.1)
