"""Retrieval through the text and memory services (the production path).

Blobs arrive validated by the memory service; `decode_memory` checks the header, shape and
checksum again as it decodes, so a wrong or corrupt answer never reaches the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from memory3.model.codecs import MemoryCodec
from memory3.model.memory import ExplicitMemory
from memory3.model.memory_format import MemoryFormatError, decode_memory

from ..memory.client import MemoryClient
from ..rpc.errors import DataLoss, DeadlineExceeded, Unavailable, error_from_rpc
from ..text.client import TextClient
from .retrieval import RetrievedReference

# Status codes that mean "the service is not there right now", as opposed to a bad request.
_OUTAGE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


class RemoteRetrieval:
    def __init__(self, text: TextClient, memory: MemoryClient, codec: MemoryCodec,
                 memory_shape: tuple[int, int, int, int]) -> None:
        self.text, self.memory, self.codec, self.shape = text, memory, codec, memory_shape

    async def retrieve(self, queries: list[list[int]], top_k: int,
                       include_text: bool) -> list[list[RetrievedReference]]:
        try:
            hits = await self.text.retrieve(queries, top_k, include_text)
        except grpc.aio.AioRpcError as e:
            if e.code() in _OUTAGE:
                raise Unavailable(f"text service: {e.details()}") from e
            raise error_from_rpc(e) from e
        return [[RetrievedReference(rid, score, text) for rid, score, text in found] for found in hits]

    async def fetch(self, ids: Sequence[str]) -> list[ExplicitMemory]:
        try:
            blobs = await self.memory.get(ids)
        except (Unavailable, DeadlineExceeded) as e:
            raise Unavailable(f"memory service: {e}") from e
        return await asyncio.to_thread(self._decode, list(ids), blobs)

    def _decode(self, ids: list[str], blobs: list[bytes]) -> list[ExplicitMemory]:
        out = []
        for rid, blob in zip(ids, blobs, strict=True):
            try:
                out.append(decode_memory(blob, self.codec, expected_shape=self.shape))
            except MemoryFormatError as e:
                raise DataLoss(f"memory {rid!r} failed validation in the decoder: {e}") from e
        return out
