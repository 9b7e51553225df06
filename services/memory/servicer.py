"""MemoryService: translates protos to MemoryStore calls and back, nothing more."""

from __future__ import annotations

from collections.abc import Callable

from memory3.v1 import memory_service_pb2 as pb
from memory3.v1 import memory_service_pb2_grpc as pb_grpc

from ..rpc.errors import rpc_errors
from .engine import RAM, REDIS, S3, MemoryStore

TIER_TO_PB = {RAM: pb.TIER_RAM, REDIS: pb.TIER_REDIS, S3: pb.TIER_S3}
SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(self, store: Callable[[], MemoryStore]) -> None:
        """`store()` returns the open store, or raises Unavailable while the service is starting."""
        self.store = store

    @rpc_errors
    async def GetMemories(self, request, context):  # noqa: N802 - gRPC method name
        store = self.store()
        fetched = await store.get(list(request.ids))
        return pb.GetMemoriesResponse(
            memories=[pb.Memory(id=m.id, blob=m.blob, tier=TIER_TO_PB[m.tier]) for m in fetched],
            release=store.release, bank=store.bank)

    @rpc_errors
    async def PutMemories(self, request, context):  # noqa: N802
        stored = await self.store().put([(m.id, m.blob) for m in request.memories])
        return pb.PutMemoriesResponse(stored=stored)

    @rpc_errors
    async def GetStats(self, request, context):  # noqa: N802
        stats = await self.store().stats()
        return pb.GetStatsResponse(
            tiers=[pb.TierStats(tier=TIER_TO_PB[t.tier], hits=t.hits, misses=t.misses, available=t.available)
                   for t in stats.tiers],
            ram_entries=stats.ram_entries, ram_bytes=stats.ram_bytes, release=stats.release)
