"""Retrieval through the text and memory services (the production path).

Blobs arrive validated by the memory service; `decode_memory` checks the header, shape and
checksum again as it decodes, so a wrong or corrupt answer never reaches the model.

Decoded memories are kept in the decoder's own RAM tier (an LRU bounded by bytes), in front of the
memory service, as LMCache keeps hot KV in the serving process's CPU memory before its remote
tiers: a hit costs neither a round trip nor a decode, which otherwise run on the cores that decode.
The decoder serves one release for its lifetime, so a memory id names the same memory throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from memory3.model.codecs import MemoryCodec
from memory3.model.memory import ExplicitMemory
from memory3.model.memory_format import MemoryFormatError, decode_memory

from ..memory.client import MemoryClient
from ..memory.ram_cache import RamCache
from ..rpc import metrics
from ..rpc.errors import DataLoss, ServiceError, Unavailable, error_from_rpc, with_code
from ..text.client import ShardedTextClient, ShardMismatch, TextClient
from .retrieval import RetrievedReference

# Status codes that mean "the service is not there right now", as opposed to a bad request.
# A text service that cannot answer now, overloaded included: the retrieval policy decides (under
# "continue" the stream goes on without memory; under "fail" the client gets UNAVAILABLE, to retry).
_OUTAGE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
           grpc.StatusCode.RESOURCE_EXHAUSTED)
TIER = "decoder"  # the `tier` label of the decoder's own RAM tier in the memory fetch metrics
_FETCHES, _HITS, _MISSES = (m.labels(tier=TIER) for m in (metrics.MEMORY_FETCHES, metrics.MEMORY_HITS,
                                                           metrics.MEMORY_MISSES))


# Status codes of a service that refuses the decoder itself: another release (ids it does not hold), another
# token, an address of another service. The deployment's to fix, never the client's: the client was told
# NOT_FOUND or UNAUTHENTICATED as if its request or its own token were wrong. Unavailable, for the policy.
_REFUSED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNIMPLEMENTED)


def _outage(code: grpc.StatusCode, details: str) -> bool:
    """A service that cannot answer now, for the retrieval policy to judge. gRPC's own
    RESOURCE_EXHAUSTED for a message over a channel's limit is not one: a setting to fix, which
    waiting or generating without memory would hide."""
    return code in _OUTAGE and not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details)


def memory_nbytes(memory: ExplicitMemory) -> int:
    return sum(t.nbytes for t in (memory.keys, memory.values, memory.positions))


def decoded_memory_cache(max_bytes: int) -> RamCache[ExplicitMemory] | None:
    """The decoder's RAM tier; None when `max_bytes` is 0."""
    return RamCache(max_bytes, sizeof=memory_nbytes) if max_bytes else None


class RemoteRetrieval:
    """`release`: the decoder's. The text service names the release it answered from; one of
    another release (a rollout half done, a stale address) returns its references: a fact a
    `kb remove` withdrew, or ids the memory service does not know. Such an answer is Unavailable."""

    def __init__(self, text: TextClient | ShardedTextClient, memory: MemoryClient, codec: MemoryCodec,
                 memory_shape: tuple[int, int, int, int], *, cache: RamCache[ExplicitMemory] | None = None,
                 release: str | None = None) -> None:
        self.text, self.memory, self.codec, self.shape = text, memory, codec, memory_shape
        self.cache, self.release = cache, release

    async def retrieve(self, queries: list[list[int]], top_k: int,
                       include_text: bool) -> list[list[RetrievedReference]]:
        try:
            hits = await self.text.retrieve(queries, top_k, include_text)
        except grpc.aio.AioRpcError as e:
            if _outage(e.code(), e.details() or ""):
                raise Unavailable(f"text service: {e.details()}") from e
            if e.code() in _REFUSED:
                raise Unavailable(f"the text service refused the decoder ({e.code().name}: {e.details()})") from e
            raise error_from_rpc(e) from e
        except ShardMismatch as e:
            raise Unavailable(f"text service: {e}") from e
        if self.release and self.text.release and self.text.release != self.release:
            raise Unavailable(f"the text service serves release {self.text.release!r}, this decoder {self.release!r}: "
                              f"point --text-address at a text service of {self.release!r}")
        if len(hits) != len(queries):  # an answer of another shape failed the model's step, and its whole batch
            raise Unavailable(f"the text service answered {len(hits)} results for {len(queries)} queries: "
                              "a text service of another version?")
        return [[RetrievedReference(rid, score, text) for rid, score, text in found[:top_k or None]]
                for found in hits]

    def cached(self, ids: Sequence[str]) -> list[ExplicitMemory] | None:
        """The memories of `ids` when the decoder's RAM tier holds every one, else None (nothing counted)."""
        if self.cache is None:
            return None
        found = [self.cache.get(rid) for rid in ids]
        if any(memory is None for memory in found):
            return None
        unique = len(set(ids))  # counted as `fetch` counts them
        _FETCHES.inc(unique)
        _HITS.inc(unique)
        return found  # type: ignore[return-value]

    async def fetch(self, ids: Sequence[str]) -> list[ExplicitMemory]:
        unique = list(dict.fromkeys(ids))
        found: dict[str, ExplicitMemory] = {}
        if self.cache is not None:
            for rid in unique:
                memory = self.cache.get(rid)
                if memory is not None:
                    found[rid] = memory
            _FETCHES.inc(len(unique))
            _HITS.inc(len(found))
            _MISSES.inc(len(unique) - len(found))
        missing = [rid for rid in unique if rid not in found]
        if missing:
            try:
                blobs = await self.memory.get(missing)
            except ServiceError as e:
                # As for the text service: an outage (a pod stopped mid-call answers CANCELLED) or an
                # overload is for the retrieval policy to judge, never the client's own CANCELLED.
                if _outage(e.code, str(e)):
                    raise Unavailable(f"memory service: {e}") from e
                if e.code in _REFUSED:
                    raise Unavailable(f"the memory service refused the decoder ({with_code(e)})") from e
                raise
            decoded = await asyncio.to_thread(self._decode, missing, blobs)
            for rid, memory in zip(missing, decoded, strict=True):
                found[rid] = memory
                if self.cache is not None:
                    self.cache.put(rid, memory)
        return [found[rid] for rid in ids]

    def _decode(self, ids: list[str], blobs: list[bytes]) -> list[ExplicitMemory]:
        out = []
        for rid, blob in zip(ids, blobs, strict=True):
            try:
                out.append(decode_memory(blob, self.codec, expected_shape=self.shape))
            except MemoryFormatError as e:
                raise DataLoss(f"memory {rid!r} failed validation in the decoder: {e}") from e
        return out
