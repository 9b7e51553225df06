"""A typed client of the TextService, for the decoder (and tests, tools), and one of an index
served in shards (`serve text --index-shard I/N`), which asks every shard and merges.

Errors are not translated: a failed call raises `grpc.aio.AioRpcError` with the server's status
code and message, so a caller can tell bad input (INVALID_ARGUMENT) from a service that is not
ready or overloaded (UNAVAILABLE, RESOURCE_EXHAUSTED). Shards that do not make one index (another
release, a shard missing or twice) raise `ShardMismatch`: a deployment in the middle of a rollout,
or one configured wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import NamedTuple

import grpc

from memory3.v1 import text_service_pb2 as pb
from memory3.v1 import text_service_pb2_grpc as pb_grpc

from ..retrieval.index import by_rank

# (reference id = memory id, cosine score, text or "" when not requested), best first.
Hit = tuple[str, float, str]


class Answer(NamedTuple):
    """One service's answer to a retrieval, and what it says about itself."""

    hits: list[list[Hit]]  # per query
    release: str
    shard: tuple[int, int]  # (index, count) of the index shard that answered; (0, 1): the whole index
    top_k: int  # references asked for per query (the release's default for a request's 0)


class TextClient:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float | None = 10.0) -> None:
        self.stub = pb_grpc.TextServiceStub(channel)
        self.timeout_s = timeout_s
        self.release: str | None = None  # the release that answered the last retrieval

    async def retrieve(self, token_id_queries: Sequence[Sequence[int]], top_k: int = 0,
                       include_text: bool = False) -> list[list[Hit]]:
        """One result per query (a chunk's token ids); top_k 0 means the release's memories per chunk."""
        return (await self.answer(_token_queries(token_id_queries), top_k, include_text)).hits

    async def retrieve_texts(self, queries: Sequence[str], top_k: int = 0,
                             include_text: bool = False) -> list[list[Hit]]:
        """The same, for queries given as text (a question, for RAG)."""
        return (await self.answer(_text_queries(queries), top_k, include_text)).hits

    async def answer(self, queries: list[pb.RetrievalQuery], top_k: int, include_text: bool) -> Answer:
        request = pb.RetrieveRequest(queries=queries, top_k=top_k, include_text=include_text)
        response = await self.stub.Retrieve(request, timeout=self.timeout_s)
        self.release = response.release
        return Answer([[(r.id, r.score, r.text) for r in result.references] for result in response.results],
                      response.release, (response.shard_index, max(response.shard_count, 1)), response.top_k)

    async def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        response = await self.stub.Tokenize(pb.TokenizeRequest(text=text, add_bos=add_bos), timeout=self.timeout_s)
        return list(response.token_ids)

    async def detokenize(self, ids: Sequence[int]) -> str:
        response = await self.stub.Detokenize(pb.DetokenizeRequest(token_ids=list(ids)), timeout=self.timeout_s)
        return response.text


def _token_queries(queries: Sequence[Sequence[int]]) -> list[pb.RetrievalQuery]:
    return [pb.RetrievalQuery(token_ids=list(q)) for q in queries]


def _text_queries(queries: Sequence[str]) -> list[pb.RetrievalQuery]:
    return [pb.RetrievalQuery(text=q) for q in queries]


class ShardMismatch(Exception):
    """The text services asked do not hold the shards of one release's index, each once."""


class ShardedTextClient:
    """The TextClient interface over the N services that each hold one shard of an index: a
    retrieval asks them all at once and keeps, per query, the best `top_k` of their answers (the
    scores are cosines of the same embedder, so they compare across shards). Each shard filters
    its own candidates by overlap with the query, as one service would. A shard that fails fails the
    retrieval at once, and the calls to the others are cancelled."""

    def __init__(self, shards: Sequence[TextClient]) -> None:
        if not shards:
            raise ValueError("a sharded text client needs at least one shard's client")
        self.shards = list(shards)
        self.release: str | None = None  # the release that answered the last retrieval

    async def retrieve(self, token_id_queries: Sequence[Sequence[int]], top_k: int = 0,
                       include_text: bool = False) -> list[list[Hit]]:
        return await self._merged(_token_queries(token_id_queries), top_k, include_text)

    async def retrieve_texts(self, queries: Sequence[str], top_k: int = 0,
                             include_text: bool = False) -> list[list[Hit]]:
        return await self._merged(_text_queries(queries), top_k, include_text)

    async def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return await self.shards[0].tokenize(text, add_bos)  # every shard has the release's tokenizer

    async def detokenize(self, ids: Sequence[int]) -> str:
        return await self.shards[0].detokenize(ids)

    async def _merged(self, queries: list[pb.RetrievalQuery], top_k: int, include_text: bool) -> list[list[Hit]]:
        """Per query, the best top_k of all shards' hits (for 0, the release's default, which the
        shards say)."""
        calls = [asyncio.ensure_future(c.answer(queries, top_k, include_text)) for c in self.shards]
        try:
            answers = await asyncio.gather(*calls)
        except BaseException:  # a shard's call that failed, or was cancelled (its channel closed)
            for call in calls:  # the others' work is for nobody
                call.cancel()
            raise
        self.release = _one_index(answers)
        k = answers[0].top_k
        return [sorted((hit for hits in per_shard for hit in hits), key=by_rank)[:k]
                for per_shard in zip(*(a.hits for a in answers), strict=True)]


def _one_index(answers: Sequence[Answer]) -> str:
    """The release the answers come from, if they are the N shards of its index, each once."""
    releases = sorted({a.release for a in answers})
    if len(releases) > 1:
        raise ShardMismatch(f"the text services answer for different releases ({', '.join(releases)}): a rollout "
                            "in progress, or a shard left on another release")
    n = len(answers)
    got = sorted(a.shard for a in answers)
    if got != [(i, n) for i in range(n)]:
        shown = ", ".join(f"{i}/{count}" for i, count in got)
        raise ShardMismatch(f"the {n} text services hold index shards {shown}, where shards 0/{n} to {n - 1}/{n} "
                            "were expected: give each shard's address once in --text-address, and start each "
                            "shard with --index-shard I/N")
    return releases[0]
