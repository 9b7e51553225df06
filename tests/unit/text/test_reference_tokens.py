"""The text engine's cache of reference tokens (what the overlap filter compares a query with) stays
small with a real tokenizer's vocabulary, and judges references as the token ids themselves do."""

import asyncio
import random
import tracemalloc

from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.retrieval.index import VectorIndex
from memory3.services.text.engine import Query, TextEngine, TextResources
from memory3.services.trainer.overlap import overlap

from .test_engine import TrigramEmbedder

WIDE = 30_000  # where a trained tokenizer's ids lie: past 256, each int is an object of its own


class WideCodec:
    """The byte-level tokenizer with every id moved past WIDE."""

    def __init__(self) -> None:
        self.inner = TextCodec(byte_level_tokenizer())
        self.bos_id, self.vocab_size = self.inner.bos_id + WIDE, self.inner.vocab_size + WIDE

    def encode(self, text):
        return [i + WIDE for i in self.inner.encode(text)]

    def decode(self, ids):
        return self.inner.decode([i - WIDE for i in ids])


def references(count: int) -> list[str]:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(500)]
    return [" ".join(rng.choice(words) for _ in range(30))[:120] for _ in range(count)]


def wide_engine(texts: list[str]) -> TextEngine:
    ids = [f"ref{i:04d}" for i in range(len(texts))]

    def load():
        return TextResources(release="wide", codec=WideCodec(), index=VectorIndex.build(TrigramEmbedder().embed(texts),
                             ids), texts=dict(zip(ids, texts, strict=True)), default_top_k=5,
                             embedder_name=TrigramEmbedder.name)
    engine = TextEngine(load, TrigramEmbedder)
    asyncio.run(engine.start())
    return engine


def test_cached_reference_tokens_take_a_few_bytes_a_token():
    texts = references(300)
    engine = wide_engine(texts)
    tokens = sum(len(engine._resources.codec.encode(t)) for t in texts)
    ids = list(engine._resources.index.iter_ids())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for rid in ids:
            engine._reference_tokens(rid)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 6 * tokens, f"{held} bytes held for {tokens} tokens"


def test_the_filter_judges_references_as_their_token_ids_do():
    texts = references(40)
    engine = wide_engine(texts)
    codec = engine._resources.codec
    query = codec.encode(f"{texts[0]} {texts[1]}")  # holds the first two references whole
    found = asyncio.run(engine.retrieve([Query(token_ids=query)], top_k=20))[0]
    rid_text = engine._resources.texts
    assert len(found) == 20
    assert all(overlap(codec.encode(rid_text[r.id]), query) <= engine.max_overlap for r in found)
    assert not {"ref0000", "ref0001"} & {r.id for r in found}
