"""MemoryStore: explicit memories by reference id, through three tiers, protocol-neutral.

    RAM (in-process LRU) -> Redis (shared, optional) -> S3 memory bank (the source of truth)

A batch is answered in request order. Each tier is asked once per batch for what the faster ones
missed (one MGET to Redis, concurrent GETs to S3 from a thread pool), and what a slower tier
returns fills the faster ones. Every blob is validated (`validate_memory`: format version, codec
fingerprint, shape, checksum) before it is returned or cached: a corrupt Redis value is deleted
and read again from S3; a corrupt or missing S3 object is data loss, reported with its id and
never returned. Concurrent requests for the same missing memory share one S3 read.

Blocking work (S3 calls, checksums) runs off the event loop; Redis is reached with redis.asyncio.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from memory3.model.codecs import MemoryCodec
from memory3.model.memory_format import MemoryFormatError, memory_size, validate_memory

from ..release.manifest import release_key
from ..release.memory_ids import MEMORY_IDS_FILE, read_memory_ids
from ..release.reader import Release
from ..rpc.errors import SHOWN_CHARS, AlreadyExists, DataLoss, InvalidInput, NotFound, Unavailable
from ..rpc.metrics import MEMORY_CORRUPT, MEMORY_FETCH_LATENCY, MEMORY_FETCHES, MEMORY_HITS, MEMORY_MISSES
from ..storage.object_store import ObjectNotFound, ObjectStore, StoreError, StoreUnavailable
from .ram_cache import RamCache
from .redis_tier import RedisTier
from .table import ReferenceTable

log = logging.getLogger("memory3.memory")
RAM, REDIS, S3 = "ram", "redis", "s3"
TIERS = (RAM, REDIS, S3)
MAX_IDS = 1024
_SHOWN = 5  # ids listed in an error message
# Blobs read from the object store wait at most this many bytes for Redis: past it (Redis slower than
# the reads), a fill is dropped, and a later miss of it reads the bank again.
MAX_PENDING_FILL_BYTES = 64 << 20


class FetchedMemory(NamedTuple):
    id: str
    blob: bytes
    tier: str  # RAM, REDIS or S3: where it was found


class TierStats(NamedTuple):
    tier: str
    hits: int
    misses: int
    available: bool


class StoreStats(NamedTuple):
    release: str
    tiers: list[TierStats]
    ram_entries: int
    ram_bytes: int


class _BankRead(NamedTuple):
    """The outcome of one S3 read: a valid blob, or why not (shared by concurrent requests)."""

    blob: bytes | None = None
    missing: str | None = None
    corrupt: str | None = None
    unavailable: str | None = None


@dataclass
class _Read:
    """One S3 read in flight, and how many requests wait for it: one nobody waits for any more, not
    started yet, is cancelled, so that reads left by callers past their deadline (an object store
    slower than the requests) never queue before the reads of the requests that came after them."""

    future: asyncio.Future[_BankRead]  # the pool's, on the event loop
    work: Future  # the pool's own
    waiters: int = 0


def ids_per_reply(blob_bytes: int, max_message_bytes: int) -> int:
    """How many memories of `blob_bytes` one reply of at most `max_message_bytes` carries (each
    with its id and framing, under 100 bytes), up to MAX_IDS: 146 at the paper's size in 64 MiB."""
    return max(1, min(MAX_IDS, (max_message_bytes - (1 << 20)) // (blob_bytes + 100)))


def release_blob_bytes(release: Release) -> int:
    """The size of one of `release`'s memory blobs, header included."""
    return memory_size(release.memory_shape(), release.memory_codec(), release.manifest.conventions["ref_len"])


def release_ids_per_reply(release: Release, max_message_bytes: int) -> int:
    """`ids_per_reply` for the memories of `release`: the bound its memory service and its clients share."""
    return ids_per_reply(release_blob_bytes(release), max_message_bytes)


def _listing(ids: Sequence[str]) -> str:
    shown = ", ".join(i if len(i) <= SHOWN_CHARS else f"{i[:SHOWN_CHARS]}…" for i in ids[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


class MemoryStore:
    def __init__(self, *, release: str, keys: Mapping[str, str], codec: MemoryCodec,
                 shape: tuple[int, int, int, int], store: ObjectStore, ram: RamCache,
                 redis: RedisTier | None = None, s3_workers: int = 16, bank: str = "",
                 max_ids: int = MAX_IDS, digests: Mapping[str, bytes] | None = None) -> None:
        """`keys` maps the release's reference ids to their bank keys (`memories/<bank>/<id[:2]>/<id>`);
        `max_ids`: the most one request may ask for (`ids_per_reply`: what one reply can carry);
        `digests`: the sha256 of each id's blob, where the reference table has them (releases
        published before it did have none): a valid blob of another memory under an id (objects
        swapped, a wrong repair) is then caught like a corrupt one."""
        self.release, self.keys, self.codec, self.shape = release, keys, codec, tuple(shape)
        self.bank, self.max_ids, self.digests = bank, max_ids, {} if digests is None else digests
        self.store, self.ram, self.redis = store, ram, redis
        self._pool = ThreadPoolExecutor(max_workers=s3_workers, thread_name_prefix="memory3-s3")
        self._inflight: dict[str, _Read] = {}
        self._fills: list[tuple[str, bytes]] = []  # read from the object store, for Redis
        self._fill_bytes = 0
        self._filling: asyncio.Task | None = None
        self._hits = dict.fromkeys(TIERS, 0)
        self._misses = dict.fromkeys(TIERS, 0)
        self.s3_up = True

    @classmethod
    def from_release(cls, release: Release, *, ram: RamCache, redis: RedisTier | None = None,
                     s3_workers: int = 16, max_message_bytes: int | None = None) -> MemoryStore:
        max_ids = MAX_IDS if max_message_bytes is None else release_ids_per_reply(release, max_message_bytes)
        bank = release.manifest.memory_bank["bank"]
        if MEMORY_IDS_FILE in release.manifest.files:
            ids = read_memory_ids(release.local_file(MEMORY_IDS_FILE), release.manifest.memory_bank["count"])
            table = ReferenceTable.from_memory_ids(ids, bank)
        else:  # published before it, or naming keys apart: the table, row by row, its texts never held
            # (tens of GB at 10^8 references)
            table = ReferenceTable.from_rows(release.rows(), bank)
        return cls(release=release.name, keys=table.keys, digests=table.digests,
                   codec=release.memory_codec(), shape=release.memory_shape(), store=release.store, ram=ram,
                   redis=redis, s3_workers=s3_workers, bank=bank, max_ids=max_ids)

    # ---- requests -----------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[str]) -> list[str]:
        """The distinct ids, in first-seen order; errors say what to fix."""
        if not ids:
            raise InvalidInput(f"no ids given: ask for 1 to {self.max_ids} reference ids of release {self.release!r}")
        if len(ids) > self.max_ids:
            why = "" if self.max_ids == MAX_IDS else " (as many of this release's memories as one reply carries)"
            raise InvalidInput(f"{len(ids)} ids in one request; at most {self.max_ids}{why}: split the batch")
        unique = list(dict.fromkeys(ids))
        unknown = [i for i in unique if i not in self.keys]
        if unknown:
            raise NotFound(f"{len(unknown)} of {len(unique)} ids are not references of release {self.release!r}: "
                           f"{_listing(unknown)}")
        return unique

    def _validate(self, rid: str, blob: bytes) -> str | None:
        try:
            validate_memory(blob, self.codec, self.shape)
        except MemoryFormatError as e:
            return str(e)
        want = self.digests.get(rid)
        if want is not None and hashlib.sha256(blob).digest() != want:
            return f"a valid memory, but not {rid}'s: its sha256 differs from the reference table's"
        return None

    def _count(self, tier: str, asked: int, hits: int, started: float) -> None:
        MEMORY_FETCH_LATENCY.labels(tier=tier).observe(time.perf_counter() - started)
        MEMORY_FETCHES.labels(tier=tier).inc(asked)
        MEMORY_HITS.labels(tier=tier).inc(hits)
        MEMORY_MISSES.labels(tier=tier).inc(asked - hits)
        self._hits[tier] += hits
        self._misses[tier] += asked - hits

    async def get(self, ids: Sequence[str]) -> list[FetchedMemory]:
        """Validated blobs for `ids`, in request order (repeated ids are answered each time).

        Raises:
            InvalidInput: no ids, or more than MAX_IDS.
            NotFound: ids that are not references of the release.
            DataLoss: a blob is corrupt or missing in the bank (it is never returned).
            Unavailable: the object store cannot be reached for a memory no cache holds.
        """
        unique = self._check_ids(ids)
        found: dict[str, tuple[bytes, str]] = {}

        started = time.perf_counter()
        for rid in unique:
            blob = self.ram.get(self.keys[rid])
            if blob is not None:
                found[rid] = (blob, RAM)
        self._count(RAM, len(unique), len(found), started)

        missing = [rid for rid in unique if rid not in found]
        if missing and self.redis is not None:
            for rid, blob in (await self._from_redis(missing)).items():
                found[rid] = (blob, REDIS)
                self.ram.put(self.keys[rid], blob)

        missing = [rid for rid in unique if rid not in found]
        for rid in missing:  # a read that ended while this request waited for Redis has filled RAM
            blob = self.ram.get(self.keys[rid]) if self.redis is not None else None
            if blob is not None:
                found[rid] = (blob, RAM)
        missing = [rid for rid in unique if rid not in found]
        if missing:  # no await since the look above: a read in flight now is joined, not repeated
            for rid, blob in (await self._from_s3(missing)).items():
                found[rid] = (blob, S3)
        return [FetchedMemory(rid, *found[rid]) for rid in ids]

    async def _from_redis(self, ids: list[str]) -> dict[str, bytes]:
        started = time.perf_counter()
        values = await self.redis.mget([self.keys[rid] for rid in ids])
        if values is None:  # down: the object store answers instead
            return {}
        present = [(rid, v) for rid, v in zip(ids, values, strict=True) if v is not None]
        problems = await asyncio.to_thread(lambda: [self._validate(rid, v) for rid, v in present])
        good, corrupt = {}, []
        for (rid, blob), problem in zip(present, problems, strict=True):
            if problem is None:
                good[rid] = blob
            else:
                corrupt.append(rid)
                MEMORY_CORRUPT.labels(tier=REDIS).inc()
                log.warning("corrupt memory %s in Redis (%s); deleting it and reading the bank", rid, problem)
        self._count(REDIS, len(ids), len(good), started)
        await self.redis.delete([self.keys[rid] for rid in corrupt])
        return good

    def _read_bank(self, rid: str) -> _BankRead:
        """In a pool thread: one S3 GET, validated."""
        try:
            blob = self.store.get_bytes(self.keys[rid])
        except ObjectNotFound as e:
            return _BankRead(missing=str(e))
        except StoreUnavailable as e:
            return _BankRead(unavailable=str(e))
        problem = self._validate(rid, blob)
        return _BankRead(corrupt=problem) if problem else _BankRead(blob=blob)

    def _settle(self, rid: str, read: _Read) -> None:
        """A read ended: it leaves the in-flight map, and its blob goes to RAM here, and to Redis in the
        background, whether or not a request still waits for it: one past its deadline left the
        caches cold, and every later request, on every replica, read S3 again. No reply waits for
        Redis to take a blob."""
        if self._inflight.get(rid) is read:
            del self._inflight[rid]
        future = read.future
        if not future.cancelled() and future.exception() is None and future.result().blob is not None:
            blob = future.result().blob
            self.ram.put(self.keys[rid], blob)
            self._fill_redis(self.keys[rid], blob)

    def _fill_redis(self, key: str, blob: bytes) -> None:
        if self.redis is None or self._fill_bytes + len(blob) > MAX_PENDING_FILL_BYTES:
            return
        self._fills.append((key, blob))
        self._fill_bytes += len(blob)
        if self._filling is None or self._filling.done():
            self._filling = asyncio.ensure_future(self._fill())

    async def _fill(self) -> None:
        """Hand the waiting blobs to Redis, as many as wait at each turn (one pipelined call each)."""
        while self._fills:
            fills, self._fills, self._fill_bytes = self._fills, [], 0
            await self.redis.set_many(fills)

    async def filled(self) -> None:
        """Wait until Redis was handed every blob read so far (for a caller that reads Redis next)."""
        while self._filling is not None and not self._filling.done():
            await asyncio.shield(self._filling)

    async def _from_s3(self, ids: list[str]) -> dict[str, bytes]:
        """`ids` are distinct: each read counts this request once among its waiters."""
        started = time.perf_counter()
        owned, reads = set(), []  # the reads this request started (it reports their corruption), and all
        for rid in ids:
            read = self._inflight.get(rid)
            if read is None:
                work = self._pool.submit(self._read_bank, rid)
                read = self._inflight[rid] = _Read(asyncio.wrap_future(work), work)
                read.future.add_done_callback(lambda _f, rid=rid, read=read: self._settle(rid, read))
                owned.add(rid)
            read.waiters += 1
            reads.append(read)
        try:
            # shield: a cancelled request must not cancel reads other requests are waiting for
            results = dict(zip(ids, await asyncio.gather(*(asyncio.shield(r.future) for r in reads)), strict=True))
        finally:
            for rid, read in zip(ids, reads, strict=True):
                read.waiters -= 1
                if read.waiters == 0 and not read.future.done() and read.work.cancel():
                    del self._inflight[rid]  # not started, and nobody waits: a later request reads it anew

        good = {rid: r.blob for rid, r in results.items() if r.blob is not None}
        self._count(S3, len(ids), len(good), started)
        corrupt = [rid for rid, r in results.items() if r.corrupt]
        missing = [rid for rid, r in results.items() if r.missing]
        unavailable = [rid for rid, r in results.items() if r.unavailable]
        self.s3_up = not unavailable
        for rid in corrupt:
            if rid in owned:
                MEMORY_CORRUPT.labels(tier=S3).inc()
                log.error("corrupt memory %s in the object store: %s", rid, results[rid].corrupt)

        if corrupt or missing:
            bad = corrupt + missing
            first = results[bad[0]].corrupt or results[bad[0]].missing
            raise DataLoss(f"release {self.release!r}: the memory bank has {len(corrupt)} corrupt and {len(missing)} "
                           f"missing memories among those asked for ({_listing(bad)}; first: {first}); "
                           "publish them again")
        if unavailable:
            raise Unavailable(f"the object store cannot be reached for {len(unavailable)} memories not in any "
                              f"cache ({results[unavailable[0]].unavailable}); retry later")
        return good

    async def put(self, memories: Sequence[tuple[str, bytes]]) -> int:
        """Store blobs where the bank has none or a corrupt one (a repair), then warm Redis and RAM.

        Memories are immutable: a valid blob already in the bank is never replaced, since other
        replicas, their caches and every release sharing the bank may hold it. A blob equal to the
        stored one is accepted as stored (a retried repair). Two repairs of the same missing memory
        racing each other both write; the last one stays.

        Raises:
            InvalidInput: no memories, too many, or a blob that fails validation (nothing is stored).
            NotFound: ids that are not references of the release.
            AlreadyExists: the bank holds another valid blob for an id (nothing is stored).
            Unavailable: the object store cannot be reached.
        """
        if len(memories) > self.max_ids:
            raise InvalidInput(f"{len(memories)} memories in one request; at most {self.max_ids}: split the batch")
        items = dict(memories)
        self._check_ids(list(items))
        problems = await asyncio.to_thread(lambda: {rid: self._validate(rid, b) for rid, b in items.items()})
        bad = [rid for rid, p in problems.items() if p]
        if bad:
            raise InvalidInput(f"{len(bad)} memories are not valid blobs for release {self.release!r} "
                               f"(codec {self.codec.name}, shape {self.shape}): {_listing(bad)}; "
                               f"first: {problems[bad[0]]}")
        loop = asyncio.get_running_loop()
        stored = dict(zip(items, await asyncio.gather(*(loop.run_in_executor(self._pool, self._read_bank, rid)
                                                        for rid in items)), strict=True))
        unavailable = next((r.unavailable for r in stored.values() if r.unavailable), None)
        if unavailable:
            self.s3_up = False
            raise Unavailable(f"the object store cannot be reached to store memories ({unavailable}); retry later")
        taken = [rid for rid, r in stored.items() if r.blob is not None and r.blob != items[rid]]
        if taken:
            raise AlreadyExists(f"{len(taken)} memories are already in the bank of release {self.release!r} with "
                                f"other content ({_listing(taken)}): memories are immutable, so only a missing or "
                                "corrupt one is written; publish a release to change what a reference holds")
        writes = [(self.keys[rid], blob) for rid, blob in items.items() if stored[rid].blob is None]
        try:
            await asyncio.gather(*(loop.run_in_executor(self._pool, self.store.put_bytes, key, blob)
                                   for key, blob in writes))
        except StoreUnavailable as e:
            self.s3_up = False
            raise Unavailable(f"the object store cannot be reached to store memories ({e}); retry later") from e
        self.s3_up = True
        fills = [(self.keys[rid], blob) for rid, blob in items.items()]
        for key, blob in fills:
            self.ram.put(key, blob)
        if self.redis is not None:
            await self.redis.set_many(fills)
        return len(items)

    # ---- state ---------------------------------------------------------------------------------
    async def check_s3(self) -> bool:
        """Ask the object store now (a HEAD of the release's manifest, and of one memory of its bank)
        and update `s3_up`: a service that no request reaches (out of its Service while the store was
        down) learns it is back. The bank is asked too: credentials allowed the releases' prefix but
        not the memories' (a policy per prefix) kept the service ready while every S3 read failed."""
        keys = [release_key(self.release, "manifest.json"), *itertools.islice(self.keys.values(), 1)]
        try:
            for key in keys:  # a memory missing from the bank is an answer: data loss, for its requests
                await asyncio.to_thread(self.store.exists, key)
        except StoreError as e:
            if self.s3_up:
                log.warning("the object store does not answer (%s)", e)
            self.s3_up = False
            return False
        if not self.s3_up:
            log.info("the object store answers again")
        self.s3_up = True
        return True

    async def answers(self) -> bool:
        """Readiness: whether a memory that RAM does not hold can be served. S3 answering is enough;
        without it, a Redis tier that answers still serves the memories it holds. With neither, every
        request but for the few memories in RAM fails, and a load balancer should send it elsewhere."""
        if await self.check_s3():
            return True
        return self.redis is not None and await self.redis.ping()

    async def stats(self) -> StoreStats:
        redis_up = False
        if self.redis is not None:
            redis_up = self.redis.up or (self.redis.should_try() and await self.redis.ping())
        available = {RAM: True, REDIS: redis_up, S3: self.s3_up}
        tiers = [TierStats(t, self._hits[t], self._misses[t], available[t]) for t in TIERS]
        return StoreStats(self.release, tiers, len(self.ram), self.ram.bytes)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._filling is not None:
            self._filling.cancel()
        if self.redis is not None:
            await self.redis.close()
