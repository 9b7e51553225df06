"""Facts added with `kb add` are answered through explicit memory, without retraining.

A `tiny` model is trained here for the one skill this needs: reading a value out of its chunk's
memory (stage 2 on single-chunk samples of fresh entities). It is published with the Debian
references only, new entities are written as documents and added with `kb_add`, and their
questions are answered with the derived release's own retrieval (MiniLM + FAISS) and memory bank.
The parent release, which lacks the new documents, is the control.

One entity of each kind is added. A model this small copies a value by its cue and type but does
not tell apart two entities of one kind whose memories a chunk reads together (the benchmark
`memory3 bench quality` measures that case on the `small` release); with one entity per kind the
other retrieved memories hold no value of the asked type.
"""

import dataclasses
import random

import pytest

from memory3.bench.quality import make_retriever
from memory3.model.checkpoint import weights_digest
from memory3.services.release.reader import Release
from memory3.services.trainer.evaluate import Question, answer_questions
from memory3.services.trainer.pipeline import PipelineConfig, run_pipeline
from memory3.services.trainer.releases import kb_add, publish_trained
from memory3.services.trainer.train import StageConfig, TrainConfig
from memory3.services.trainer.world import qa_prompt

pytestmark = pytest.mark.integration

READER = PipelineConfig(
    preset="tiny", vocab_size=1024, world_train=200, world_heldout=40, real_documents=200, eval_questions=16,
    train=TrainConfig(seq_len=64, batch_size=32, own_reference_fraction=1.0, stage2_real_fraction=0.0,
                      eval_every=10_000, checkpoint_every=10_000, stage1=StageConfig(steps=0, lr=1e-3),
                      stage2=StageConfig(steps=1500, lr=6e-3), stage3=StageConfig(steps=0, lr=3e-4),
                      attention_weight=0.0))


@pytest.fixture(scope="module")
def reader(tmp_path_factory, store, embedder):
    result = run_pipeline(READER, tmp_path_factory.mktemp("reader"), progress=False)
    debian_only = dataclasses.replace(result, references=[r for r in result.references if r.source == "debian"])
    publish_trained(debian_only, store, "reader-1", embedder=embedder, progress=False,
                    pipeline_config=READER.to_dict())
    return result


def new_entities(world, rng, label):
    """One fresh entity of each kind (see the module docstring)."""
    found: dict[str, object] = {}
    while len(found) < 4:
        entity = world.fresh_entity(rng, f"{label}-{len(found)}")
        found.setdefault(entity.kind, entity)
    return list(found.values())


def answer_with(store, embedder, name, questions, cache):
    release = Release.open(store, name, cache)
    codec = release.text_codec()
    texts = {r["id"]: r["text"] for r in release.references}
    answers = answer_questions(release.load_model(), codec, questions, "memory",
                               retrieve=make_retriever(release, embedder, codec), reference_text=texts,
                               memory_lookup=release.fetch_memories)
    return answers, release


def test_facts_added_with_kb_add_are_answered_with_memory(reader, store, embedder, tmp_path):
    rng = random.Random("kb-add")
    cache = tmp_path / "cache"
    with_documents, without = [], []
    for round_ in range(3):  # three derived releases of four new entities each: 36 questions
        entities = new_entities(reader.world, rng, f"added{round_}")
        corpus = tmp_path / f"new-{round_}.txt"
        corpus.write_text("\n\n".join(e.document for e in entities) + "\n", encoding="utf-8")
        name = f"reader-1-added-{round_}"
        kb_add(store, "reader-1", [corpus], name, cache, embedder=embedder, progress=False)
        questions = [Question(qa_prompt(f), f.answer) for e in entities for f in e.facts]
        answers, child = answer_with(store, embedder, name, questions, cache)
        assert weights_digest(child.load_model()) == weights_digest(reader.model)  # nothing was retrained
        with_documents += [a == q.answer for a, q in zip(answers, questions, strict=True)]
        control, _ = answer_with(store, embedder, "reader-1", questions, cache)
        without += [a == q.answer for a, q in zip(control, questions, strict=True)]
    n = len(with_documents)
    # The model is trained in this test, so its figures move with the CPU's kernels and the seed (16,
    # 20 and 18 of 36 for seeds 0, 1 and 2 on an EPYC, the control 1 each time; with 1000 training
    # steps, 12 to 16): the bar is a clear effect over the control, not a score.
    assert sum(with_documents) >= 0.3 * n, (sum(with_documents), n)
    assert sum(without) <= 0.15 * n, (sum(without), n)  # without the documents the values are guesses
    assert sum(with_documents) >= 3 * max(1, sum(without)), (sum(with_documents), sum(without))
