"""Where the decoder's memories come from: an interface, and an in-process implementation.

The engine only needs two awaitables: retrieve references for some token-id queries, and fetch
their memories. In production they are the text and memory services (`remote.py`); in-process
(tests, benchmarks, `memory3 generate --release` without servers) they read the release directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from memory3.model.memory import ExplicitMemory


@dataclass(frozen=True)
class RetrievedReference:
    id: str
    score: float
    text: str = ""


class Retrieval(Protocol):
    async def retrieve(self, queries: list[list[int]], top_k: int,
                       include_text: bool) -> list[list[RetrievedReference]]:
        """Per token-id query, the best references (best first), overlap filter applied."""

    async def fetch(self, ids: Sequence[str]) -> list[ExplicitMemory]:
        """The memories of these reference ids, in order, validated."""


class LocalRetrieval:
    """Retrieval straight from an opened release: its index, embedder and memory bank."""

    def __init__(self, release, embedder, *, max_overlap: float | None = None) -> None:
        from memory3.services.trainer.overlap import EVAL_MAX_OVERLAP

        self.release, self.embedder = release, embedder
        self.codec = release.text_codec()
        self.index = release.index()
        self.max_overlap = EVAL_MAX_OVERLAP if max_overlap is None else max_overlap
        self._ref_tokens: dict[str, list[int]] = {}

    def _search(self, queries: list[list[int]], top_k: int, include_text: bool) -> list[list[RetrievedReference]]:
        from memory3.services.trainer.overlap import overlap

        texts = [self.codec.decode(q) for q in queries]
        hits = self.index.search(self.embedder.embed(texts), top_k + 5)
        out = []
        for query, found in zip(queries, hits, strict=True):
            kept = []
            for rid, score in found:
                tokens = self._ref_tokens.setdefault(rid, self.codec.encode(self.release.by_id[rid]["text"]))
                if overlap(tokens, query) > self.max_overlap:
                    continue
                kept.append(RetrievedReference(rid, float(score),
                                               self.release.by_id[rid]["text"] if include_text else ""))
            out.append(kept[:top_k])
        return out

    async def retrieve(self, queries: list[list[int]], top_k: int,
                       include_text: bool) -> list[list[RetrievedReference]]:
        return await asyncio.to_thread(self._search, queries, top_k, include_text)

    async def fetch(self, ids: Sequence[str]) -> list[ExplicitMemory]:
        return await asyncio.to_thread(self.release.fetch_memories, list(ids))
