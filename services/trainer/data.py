"""Training sequences, each a pure function of (seed, stage, index).

Because sample i is generated from its own seeded RNG, the data position after a resume is
just the step counter: no iterator state is saved, and every rank of a data-parallel run can
build its own samples without coordination.

Stage 1 (warm-up, no memory) mixes real English, documents of fresh entities (see below), each
followed by questions about it, and stand-alone question/answer pairs about train entities: it
teaches the language, the question/answer format and copying a value from the context (a fresh
entity's answers are in its document only), which reading a memory reuses.

Stage 2 (continual training with memory) holds question blocks about entities; each 64-token
chunk retrieves one reference, the document of the entity its tokens are mostly about (the
embedding index returns that document first for >99% of such queries; asking the world
directly keeps the training step free of embedder calls), and reads it together with the
references of the previous 4 chunks, as in the paper. References that overlap the sequence by
more than 90% are excluded.

Why stage 2 asks about fresh entities: train entities recur across the run, so their answers can
be memorized in the weights, and a model that memorizes never needs its memory; held-out
questions then fail. By default every stage-2 entity is instead a fresh one, generated from the
sample's own RNG (`World.fresh_entity`: the world's templates and pools, a name no world entity
has), so it is seen exactly once and its answers are predictable only from its reference.
`fresh_fraction` mixes in train entities. Stage-2 samples also carry per-target loss weights:
answer tokens (and the newline that ends them) weigh `answer_weight`, the rest 1. Question text
is mostly a fixed template that needs no memory; the answers are the memory-dependent signal.

Why stage 2 starts with single-chunk samples: copying a value out of the one memory a chunk
reads is learned within about a thousand steps of 64-token samples, while with the previous
chunks' references beside it (other entities, often with the same cues) the same model made no
progress in as many steps of 256-token samples. The first part of stage 2 therefore trains on
samples one chunk long that read only their own reference (`stage2(i, single_chunk=True)`, keyed
apart from the full-length samples); the rest reads the previous 4 chunks' too, as in the paper.
Stage 3 (train.py) reuses these samples, alternating single-chunk and full-length ones, and fills
every group up to 5 with references of other samples in the batch, same kind first
(`train.batch_groups`): serving retrieves 5 references per chunk, mostly of the same kind, and
the model must learn to tell the right one from its neighbours. Each sample therefore records
the entity id and kind of its references.

Why stage 2 also holds real text: trained on question blocks alone, the small model forgot the
language it learned in stage 1 (held-out Debian perplexity 188k, above the vocabulary size), and
a model without language reads documents in its context poorly, which made the RAG baseline
weak for the wrong reason. A `stage2_real_fraction` of stage-2 samples (single-chunk ones too)
are therefore real text reading no memory: the knowledge base holds these same documents, so the
one reference such a chunk would retrieve is its own text, which the overlap filter excludes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from memory3.model.config import Memory3Config
from memory3.model.tokenizer import TextCodec

from .overlap import TRAIN_MAX_OVERLAP, overlap
from .world import Entity, Fact, World, qa_prompt, qa_text

PREVIOUS_CHUNKS = 4  # a chunk also reads the references of this many previous chunks


@dataclass(frozen=True)
class MemorySample:
    tokens: list[int]  # seq_len + 1 body tokens, starting with <s>
    references: list[list[int]]  # distinct reference token lists used by this sample
    groups: list[list[int]]  # per chunk: indices into `references` it reads (at most mems_per_chunk)
    weights: list[float] | None = None  # seq_len loss weights, one per target tokens[1:]; None: all 1
    # Per reference: the id and kind of the entity it describes, which `batch_groups` uses to pick
    # distractors of the same kind from other samples of a batch.
    reference_ids: list[str] = field(default_factory=list)
    reference_kinds: list[str] = field(default_factory=list)
    # Per target (tokens[1:]): the index into `references` of the reference that holds the answer
    # when the target is an answer token, else -1. Training supervises memory attention there.
    answer_references: list[int] | None = None


class TrainingData:
    def __init__(self, world: World, codec: TextCodec, config: Memory3Config, *, seq_len: int, seed: int,
                 real_text: Sequence[str] = (), real_fraction: float = 0.25, fresh_fraction: float = 1.0,
                 answer_weight: float = 1.0, stage2_real_fraction: float = 0.0) -> None:
        if seq_len % config.chunk_len:
            raise ValueError(f"seq_len={seq_len} must be a multiple of chunk_len={config.chunk_len}")
        if not 0.0 <= fresh_fraction <= 1.0:
            raise ValueError(f"fresh_fraction={fresh_fraction} must lie in [0, 1]")
        if answer_weight <= 0:
            raise ValueError(f"answer_weight={answer_weight} must be positive")
        if not 0.0 <= stage2_real_fraction <= 1.0:
            raise ValueError(f"stage2_real_fraction={stage2_real_fraction} must lie in [0, 1]")
        self.world, self.codec, self.config = world, codec, config
        self.seq_len, self.seed = seq_len, seed
        self.train_entities = world.split("train")
        self.real_text = list(real_text)
        self.real_fraction = real_fraction if self.real_text else 0.0
        self.fresh_fraction, self.answer_weight = fresh_fraction, answer_weight
        self.stage2_real_fraction = stage2_real_fraction if self.real_text else 0.0
        self._doc_tokens: dict[str, list[int]] = {}

    def _rng(self, stage: int | str, index: int) -> random.Random:
        return random.Random(f"{self.seed}-{stage}-{index}")

    def reference_tokens(self, entity: Entity) -> list[int]:
        if entity.split == "fresh":  # seen once: not worth caching
            return self.codec.encode(entity.document)[: self.config.ref_len]
        if entity.id not in self._doc_tokens:
            self._doc_tokens[entity.id] = self.codec.encode(entity.document)[: self.config.ref_len]
        return self._doc_tokens[entity.id]

    def real_tokens(self, rng: random.Random) -> list[int]:
        return self.codec.encode(rng.choice(self.real_text) + "\n\n")

    def qa_tokens(self, fact: Fact) -> tuple[list[int], int]:
        """Tokens of one question/answer pair and how many of them are the prompt.

        The prompt is encoded on its own, exactly as evaluation encodes it, then the answer.
        """
        prompt = qa_prompt(fact)
        question = self.codec.encode(prompt)
        return question + self.codec.encode(qa_text(fact)[len(prompt):]), len(question)

    # ---- stage 1 ------------------------------------------------------------------------------
    def stage1(self, index: int) -> list[int]:
        rng = self._rng(1, index)
        ids = [self.codec.bos_id]
        while len(ids) < self.seq_len + 1:
            roll = rng.random()
            if roll < self.real_fraction:
                ids += self.real_tokens(rng)
            elif roll < self.real_fraction + 0.35:
                entity = self.world.fresh_entity(rng, f"fresh-{self.seed}-1-{index}-{len(ids)}")
                ids += self.codec.encode(entity.document + "\n")
                for fact in rng.sample(entity.facts, len(entity.facts)):
                    ids += self.codec.encode(qa_text(fact))
                ids += self.codec.encode("\n")
            else:
                entity = rng.choice(self.train_entities)
                ids += self.codec.encode(qa_text(rng.choice(entity.facts)))
        return ids[: self.seq_len + 1]

    # ---- stage 2 ------------------------------------------------------------------------------
    def stage2(self, index: int, *, single_chunk: bool = False) -> MemorySample:
        """A stage-2 sample; `single_chunk`: one chunk long, reading only its own reference."""
        rng = self._rng("2-single" if single_chunk else 2, index)
        seq_len = self.config.chunk_len if single_chunk else self.seq_len
        # Drawn only when the mix is on, so that without it the samples are what they were before.
        if self.stage2_real_fraction and rng.random() < self.stage2_real_fraction:
            ids = [self.codec.bos_id]
            while len(ids) < seq_len + 1:
                ids += self.real_tokens(rng)
            return MemorySample(ids[: seq_len + 1], [], [[] for _ in range(seq_len // self.config.chunk_len)])
        ids, owner, weights, answer = [self.codec.bos_id], [None], [1.0], [False]
        while len(ids) < seq_len + 1:
            if rng.random() < self.fresh_fraction:
                entity = self.world.fresh_entity(rng, f"fresh-{self.seed}-2-{index}-{len(ids)}")
            else:
                entity = rng.choice(self.train_entities)
            for fact in rng.sample(entity.facts, len(entity.facts)):
                qa, n_question = self.qa_tokens(fact)
                ids += qa
                owner += [entity] * len(qa)
                weights += [1.0] * n_question + [self.answer_weight] * (len(qa) - n_question)
                answer += [False] * n_question + [True] * (len(qa) - n_question)
        ids, owner, weights = ids[: seq_len + 1], owner[: seq_len + 1], weights[: seq_len + 1]
        chunk_len = self.config.chunk_len
        retrieved: list[Entity] = []
        for start in range(0, seq_len, chunk_len):
            counts: dict[str, tuple[int, Entity]] = {}
            for e in owner[start : start + chunk_len]:
                if e is not None:
                    counts[e.id] = (counts.get(e.id, (0, e))[0] + 1, e)
            retrieved.append(max(counts.values(), key=lambda x: x[0])[1])
        references: list[list[int]] = []
        reference_entities: list[Entity] = []
        ref_index: dict[str, int] = {}
        groups: list[list[int]] = []
        previous = 0 if single_chunk else PREVIOUS_CHUNKS
        for c in range(len(retrieved)):
            group: list[int] = []
            for e in retrieved[max(0, c - previous) : c + 1][::-1]:
                if e.id not in ref_index:
                    tokens = self.reference_tokens(e)
                    if overlap(tokens, ids, stride=len(tokens)) > TRAIN_MAX_OVERLAP:  # see overlap.py
                        ref_index[e.id] = -1
                    else:
                        ref_index[e.id] = len(references)
                        references.append(tokens)
                        reference_entities.append(e)
                i = ref_index[e.id]
                if i >= 0 and i not in group:
                    group.append(i)
            groups.append(group[: self.config.mems_per_chunk])
        answer_references = [ref_index.get(owner[t].id, -1) if answer[t] else -1 for t in range(1, seq_len + 1)]
        return MemorySample(ids, references, groups, weights[1:], [e.id for e in reference_entities],
                            [e.kind for e in reference_entities], answer_references)
