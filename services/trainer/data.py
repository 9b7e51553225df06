"""Training sequences, each a pure function of (seed, stage, index).

Because sample i is generated from its own seeded RNG, the data position after a resume is
just the step counter: no iterator state is saved, and every rank of a data-parallel run can
build its own samples without coordination.

Stage 1 (warm-up, no memory) mixes real English with the train entities' documents, each
followed by questions about it, and stand-alone question/answer pairs. Stage 2 (continual
training with memory) holds question blocks about train entities; each 64-token chunk retrieves
one reference, the document of the entity its tokens are mostly about (the embedding index
returns that document first for >99% of such queries; asking the world directly keeps the
training step free of embedder calls), and reads it together with the references of the
previous 4 chunks, as in the paper. References that overlap the sequence by more than 90% are
excluded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from memory3.model.config import Memory3Config
from memory3.model.tokenizer import TextCodec

from .overlap import TRAIN_MAX_OVERLAP, overlap
from .world import Entity, World, qa_text

PREVIOUS_CHUNKS = 4  # a chunk also reads the references of this many previous chunks


@dataclass(frozen=True)
class MemorySample:
    tokens: list[int]  # seq_len + 1 body tokens, starting with <s>
    references: list[list[int]]  # distinct reference token lists used by this sample
    groups: list[list[int]]  # per chunk: indices into `references` it reads (at most mems_per_chunk)


class TrainingData:
    def __init__(self, world: World, codec: TextCodec, config: Memory3Config, *, seq_len: int, seed: int,
                 real_text: Sequence[str] = (), real_fraction: float = 0.25) -> None:
        if seq_len % config.chunk_len:
            raise ValueError(f"seq_len={seq_len} must be a multiple of chunk_len={config.chunk_len}")
        self.world, self.codec, self.config = world, codec, config
        self.seq_len, self.seed = seq_len, seed
        self.train_entities = world.split("train")
        self.real_text = list(real_text)
        self.real_fraction = real_fraction if self.real_text else 0.0
        self._doc_tokens: dict[str, list[int]] = {}

    def _rng(self, stage: int, index: int) -> random.Random:
        return random.Random(f"{self.seed}-{stage}-{index}")

    def reference_tokens(self, entity: Entity) -> list[int]:
        if entity.id not in self._doc_tokens:
            self._doc_tokens[entity.id] = self.codec.encode(entity.document)[: self.config.ref_len]
        return self._doc_tokens[entity.id]

    # ---- stage 1 ------------------------------------------------------------------------------
    def stage1(self, index: int) -> list[int]:
        rng = self._rng(1, index)
        ids = [self.codec.bos_id]
        while len(ids) < self.seq_len + 1:
            roll = rng.random()
            if roll < self.real_fraction:
                ids += self.codec.encode(rng.choice(self.real_text) + "\n\n")
            elif roll < self.real_fraction + 0.35:
                entity = rng.choice(self.train_entities)
                ids += self.codec.encode(entity.document + "\n")
                for fact in rng.sample(entity.facts, len(entity.facts)):
                    ids += self.codec.encode(qa_text(fact))
                ids += self.codec.encode("\n")
            else:
                entity = rng.choice(self.train_entities)
                ids += self.codec.encode(qa_text(rng.choice(entity.facts)))
        return ids[: self.seq_len + 1]

    # ---- stage 2 ------------------------------------------------------------------------------
    def stage2(self, index: int) -> MemorySample:
        rng = self._rng(2, index)
        ids, owner = [self.codec.bos_id], [None]
        while len(ids) < self.seq_len + 1:
            entity = rng.choice(self.train_entities)
            for fact in rng.sample(entity.facts, len(entity.facts)):
                qa = self.codec.encode(qa_text(fact))
                ids += qa
                owner += [entity] * len(qa)
        ids, owner = ids[: self.seq_len + 1], owner[: self.seq_len + 1]
        chunk_len = self.config.chunk_len
        retrieved: list[Entity] = []
        for start in range(0, self.seq_len, chunk_len):
            counts: dict[str, tuple[int, Entity]] = {}
            for e in owner[start : start + chunk_len]:
                if e is not None:
                    counts[e.id] = (counts.get(e.id, (0, e))[0] + 1, e)
            retrieved.append(max(counts.values(), key=lambda x: x[0])[1])
        references: list[list[int]] = []
        ref_index: dict[str, int] = {}
        groups: list[list[int]] = []
        for c in range(len(retrieved)):
            group: list[int] = []
            for e in retrieved[max(0, c - PREVIOUS_CHUNKS) : c + 1][::-1]:
                if e.id not in ref_index:
                    tokens = self.reference_tokens(e)
                    if overlap(tokens, ids) > TRAIN_MAX_OVERLAP:
                        ref_index[e.id] = -1
                    else:
                        ref_index[e.id] = len(references)
                        references.append(tokens)
                i = ref_index[e.id]
                if i >= 0 and i not in group:
                    group.append(i)
            groups.append(group[: self.config.mems_per_chunk])
        return MemorySample(ids, references, groups)
