"""The MemoryService as the decoder sees it: blobs by id, errors as domain errors.

Batches larger than the service's per-request limit are split and fetched concurrently, so a
caller never has to know the limit. Blobs come back validated by the service; the decoder's
`decode_memory` checks them again as it decodes (a cheap guard against a wrong server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from memory3.v1 import memory_service_pb2 as pb
from memory3.v1 import memory_service_pb2_grpc as pb_grpc

from ..rpc.errors import Unavailable, error_from_rpc
from .engine import MAX_IDS, RAM, REDIS, S3, FetchedMemory

TIER_FROM_PB = {pb.TIER_RAM: RAM, pb.TIER_REDIS: REDIS, pb.TIER_S3: S3}


class MemoryClient:
    """`bank`: the memory bank the caller's model reads (its manifest's `memory_bank.bank`). Reference
    ids are hashes of their text, so a release retrained on the same knowledge has the same ids and
    memories of the same shape, made by other weights: a service of that release (a rolling
    upgrade, a wrong address) would answer them, valid and wrong. With `bank`, such an answer is
    Unavailable instead."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float | None = 10.0, bank: str | None = None,
                 max_ids: int = MAX_IDS) -> None:
        """`max_ids`: ids per request (`ids_per_reply` for the memories' size and the channels' message limit)."""
        self.stub = pb_grpc.MemoryServiceStub(channel)
        self.timeout_s, self.bank, self.max_ids = timeout_s, bank, max_ids

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from e

    async def fetch(self, ids: Sequence[str]) -> list[FetchedMemory]:
        """(id, blob, tier) in request order.

        Raises the service's domain errors: InvalidInput (no ids), NotFound (ids not in the
        release), DataLoss (a corrupt or missing blob in the bank), Unavailable (store unreachable
        or service starting), and ServiceError for anything else.
        """
        parts = [list(ids[i:i + self.max_ids]) for i in range(0, len(ids), self.max_ids)] or [[]]
        responses = await asyncio.gather(*(self._call(self.stub.GetMemories, pb.GetMemoriesRequest(ids=part))
                                           for part in parts))
        for response in responses:
            if self.bank and response.bank and response.bank != self.bank:  # "": a service older than the field
                raise Unavailable(f"the memory service serves release {response.release!r}, whose memory bank "
                                  f"{response.bank} is not this model's ({self.bank}): its memories were made by "
                                  "other weights. Point the memory address at a service of a release of this model")
        fetched = [FetchedMemory(m.id, m.blob, TIER_FROM_PB.get(m.tier, "unknown"))
                   for response in responses for m in response.memories]
        if [m.id for m in fetched] != list(ids):  # a blob is checked for its shape, not for whose it is
            raise Unavailable(f"the memory service answered {len(fetched)} memories for {len(ids)} ids, not each "
                              "in the order asked: a memory service of another version?")
        return fetched

    async def get(self, ids: Sequence[str]) -> list[bytes]:
        """The blobs for `ids`, in request order."""
        return [m.blob for m in await self.fetch(ids)]

    async def put(self, memories: Sequence[tuple[str, bytes]]) -> int:
        """Store (id, blob) pairs in the bank and warm the caches; returns how many were stored."""
        parts = [memories[i:i + self.max_ids] for i in range(0, len(memories), self.max_ids)] or [[]]
        stored = 0
        for part in parts:
            request = pb.PutMemoriesRequest(memories=[pb.Memory(id=i, blob=b) for i, b in part])
            stored += (await self._call(self.stub.PutMemories, request)).stored
        return stored

    async def stats(self) -> pb.GetStatsResponse:
        return await self._call(self.stub.GetStats, pb.GetStatsRequest())
