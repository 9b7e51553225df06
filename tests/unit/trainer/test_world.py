import pytest

from memory3.services.trainer.world import World, qa_prompt, qa_text


def test_world_is_deterministic_given_the_seed():
    a, b, c = World(7, n_train=60, n_heldout=12), World(7, n_train=60, n_heldout=12), World(8, n_train=60, n_heldout=12)
    assert [e.document for e in a.entities] == [e.document for e in b.entities]
    assert [e.document for e in a.entities] != [e.document for e in c.entities]


def test_splits_and_unique_names():
    world = World(0, n_train=120, n_heldout=30)
    assert len(world.split("train")) == 120 and len(world.split("heldout")) == 30
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    assert len({e.id for e in world.entities}) == len(world.entities)
    assert {e.kind for e in world.entities} == {"person", "city", "organisation", "product"}


def test_every_fact_is_stated_in_the_document_and_answered_from_a_pool():
    world = World(1, n_train=60, n_heldout=10)
    pools = {v for values in world.answer_pools().values() for v in values}
    for e in world.entities:
        assert e.facts
        for fact in e.facts:
            assert fact.answer in e.document
            assert fact.answer in pools or fact.answer.isdigit()
            assert qa_text(fact).startswith(qa_prompt(fact)) and qa_text(fact).endswith(f" {fact.answer}\n")


def test_bad_sizes():
    with pytest.raises(ValueError):
        World(0, n_train=0, n_heldout=3)


def test_the_answer_starts_with_the_cue_that_precedes_the_value_in_the_document():
    world = World(2, n_train=30, n_heldout=6)
    for e in world.entities:
        cues = [f.cue for f in e.facts]
        assert len(set(cues)) == len(cues), e.document  # one cue per value: the document is unambiguous
        for fact in e.facts:
            assert f" {fact.cue} {fact.answer}" in e.document
            assert qa_prompt(fact).endswith(f"\nAnswer: {fact.cue}")
            assert e.name in qa_prompt(fact)
