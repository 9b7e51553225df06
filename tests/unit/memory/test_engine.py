"""MemoryStore's tier logic, with in-memory stand-ins for S3 and Redis (the real ones are in
tests/integration/test_memory_service.py): order, fills, validation, errors, shared reads."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from prometheus_client import REGISTRY

from memory3.model.codecs import codec_from_name
from memory3.model.memory import ExplicitMemory
from memory3.model.memory_format import encode_memory
from memory3.services.memory.engine import MAX_IDS, RAM, REDIS, S3, MemoryStore
from memory3.services.memory.ram_cache import RamCache
from memory3.services.rpc.errors import AlreadyExists, DataLoss, InvalidInput, NotFound, Unavailable
from memory3.services.storage.object_store import ObjectNotFound, StoreUnavailable

SHAPE = (2, 2, 4, 8)
CODEC = codec_from_name("fp16")
IDS = [f"{i:02d}{'ab' * 15}" for i in range(6)]


def blob_for(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(4).expand(2, 2, 4).clone()
    mem = ExplicitMemory(torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), positions)
    return encode_memory(mem, CODEC, ref_len=16)


def corrupt(blob: bytes) -> bytes:
    bad = bytearray(blob)
    bad[-1] ^= 0xFF
    return bytes(bad)


class FakeObjectStore:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects, self.down, self.gets = dict(objects), False, []
        self.gate: threading.Event | None = None  # when set, reads wait for it (to overlap requests)
        self.denied = ("no prefix",)  # keys the credentials may not read
        self.heads: list[str] = []

    def get_bytes(self, key: str) -> bytes:
        self.gets.append(key)
        if self.gate is not None:
            self.gate.wait(5)
        if self.down:
            raise StoreUnavailable("cannot reach the object store at fake")
        if key not in self.objects:
            raise ObjectNotFound(f"get {key}: NoSuchKey")
        return self.objects[key]

    def exists(self, key: str) -> bool:
        self.heads.append(key)
        if self.down or key.startswith(self.denied):
            raise StoreUnavailable(f"stat {key}: the object store refused the request (AccessDenied: denied)")
        return key in self.objects

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.down:
            raise StoreUnavailable("cannot reach the object store at fake")
        self.objects[key] = data


class FakeRedis:
    """RedisTier's interface over a dict; `down` makes it behave like an unreachable server."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.up, self.down, self.deleted = True, False, []

    def should_try(self) -> bool:
        return True

    async def mget(self, keys):
        if self.down:
            self.up = False
            return None
        self.up = True
        return [self.data.get(k) for k in keys]

    async def set_many(self, items):
        if not self.down:
            self.data.update(items)
        return not self.down

    async def delete(self, keys):
        self.deleted.extend(keys)
        for k in keys:
            self.data.pop(k, None)

    async def ping(self):
        self.up = not self.down
        return self.up

    async def close(self):
        pass


def key(rid: str) -> str:
    return f"memories/bank/{rid[:2]}/{rid}"


@pytest.fixture
def blobs() -> dict[str, bytes]:
    return {rid: blob_for(i) for i, rid in enumerate(IDS)}


@pytest.fixture
def s3(blobs) -> FakeObjectStore:
    return FakeObjectStore({key(rid): b for rid, b in blobs.items()})


@pytest.fixture
def redis() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def store(s3, redis) -> MemoryStore:
    return MemoryStore(release="r1", keys={rid: key(rid) for rid in IDS}, codec=CODEC, shape=SHAPE, store=s3,
                       ram=RamCache(1 << 20), redis=redis, s3_workers=4)


def run(coro):
    return asyncio.run(coro)


def metric(name: str, tier: str) -> float:
    return REGISTRY.get_sample_value(name, {"tier": tier}) or 0.0


def test_tiers_in_order_with_fills(store, s3, redis, blobs):
    first = run(store.get([IDS[0], IDS[1], IDS[0]]))
    assert [(m.id, m.tier) for m in first] == [(IDS[0], S3), (IDS[1], S3), (IDS[0], S3)]
    assert [m.blob for m in first] == [blobs[IDS[0]], blobs[IDS[1]], blobs[IDS[0]]]
    assert sorted(s3.gets) == sorted([key(IDS[0]), key(IDS[1])])  # the repeated id read once
    assert redis.data == {key(IDS[0]): blobs[IDS[0]], key(IDS[1]): blobs[IDS[1]]}

    assert [m.tier for m in run(store.get([IDS[1], IDS[0]]))] == [RAM, RAM]
    store.ram.discard(key(IDS[0]))
    assert [m.tier for m in run(store.get([IDS[0], IDS[1], IDS[2]]))] == [REDIS, RAM, S3]
    assert key(IDS[0]) in store.ram  # a Redis hit fills RAM
    assert len(s3.gets) == 3

    stats = {t.tier: t for t in run(store.stats()).tiers}
    assert (stats[RAM].hits, stats[RAM].misses) == (3, 4)
    assert (stats[REDIS].hits, stats[REDIS].misses) == (1, 3)
    assert (stats[S3].hits, stats[S3].misses) == (3, 0)
    assert all(t.available for t in stats.values())


def test_prometheus_counters_per_tier(store):
    before = {t: metric("memory3_memory_hits_total", t) for t in (RAM, S3)}
    fetches = metric("memory3_memory_fetches_total", S3)
    run(store.get(IDS[:2]))
    run(store.get(IDS[:2]))
    assert metric("memory3_memory_hits_total", S3) - before[S3] == 2
    assert metric("memory3_memory_fetches_total", S3) - fetches == 2
    assert metric("memory3_memory_hits_total", RAM) - before[RAM] == 2


def test_corrupt_redis_value_is_deleted_and_repaired_from_s3(store, redis, s3, blobs):
    redis.data[key(IDS[0])] = corrupt(blobs[IDS[0]])
    corrupt_before = metric("memory3_memory_corrupt_total", REDIS)
    [got] = run(store.get([IDS[0]]))
    assert got.tier == S3 and got.blob == blobs[IDS[0]]
    assert redis.deleted == [key(IDS[0])]
    assert redis.data[key(IDS[0])] == blobs[IDS[0]]  # refilled with the good copy
    assert metric("memory3_memory_corrupt_total", REDIS) - corrupt_before == 1


def test_corrupt_s3_object_is_data_loss_and_never_cached(store, s3, redis, blobs):
    s3.objects[key(IDS[3])] = corrupt(blobs[IDS[3]])
    corrupt_before = metric("memory3_memory_corrupt_total", S3)
    with pytest.raises(DataLoss, match=rf"1 corrupt and 0 missing.*{IDS[3]}.*checksum mismatch"):
        run(store.get([IDS[2], IDS[3]]))
    assert key(IDS[3]) not in store.ram and key(IDS[3]) not in redis.data
    assert key(IDS[2]) in store.ram  # the good one of the batch is still cached
    assert metric("memory3_memory_corrupt_total", S3) - corrupt_before == 1


def test_blob_of_another_shape_or_codec_is_rejected(store, s3):
    s3.objects[key(IDS[0])] = encode_memory(
        ExplicitMemory(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.arange(4).expand(1, 2, 4).clone()),
        CODEC, ref_len=16)
    with pytest.raises(DataLoss, match="shape mismatch"):
        run(store.get([IDS[0]]))
    s3.objects[key(IDS[1])] = encode_memory(
        ExplicitMemory(torch.zeros(SHAPE), torch.zeros(SHAPE), torch.arange(4).expand(2, 2, 4).clone()),
        codec_from_name("bf16"), ref_len=16)
    with pytest.raises(DataLoss, match="codec mismatch"):
        run(store.get([IDS[1]]))


def test_missing_bank_object_is_data_loss(store, s3):
    del s3.objects[key(IDS[4])]
    with pytest.raises(DataLoss, match=rf"0 corrupt and 1 missing.*{IDS[4]}"):
        run(store.get([IDS[4]]))


def test_s3_down_is_unavailable_but_cached_memories_are_served(store, s3):
    run(store.get([IDS[0]]))
    s3.down = True
    with pytest.raises(Unavailable, match="cannot be reached for 1 memories"):
        run(store.get([IDS[0], IDS[1]]))
    assert not {t.tier: t for t in run(store.stats()).tiers}[S3].available
    assert [m.tier for m in run(store.get([IDS[0]]))] == [RAM]
    s3.down = False
    run(store.get([IDS[1]]))
    assert {t.tier: t for t in run(store.stats()).tiers}[S3].available


def test_redis_down_reads_through_to_s3(store, redis, blobs):
    redis.down = True
    got = run(store.get([IDS[0], IDS[1]]))
    assert [m.tier for m in got] == [S3, S3] and got[0].blob == blobs[IDS[0]]
    assert not {t.tier: t for t in run(store.stats()).tiers}[REDIS].available
    redis.down = False
    store.ram.discard(key(IDS[2]))
    run(store.get([IDS[2]]))
    store.ram.discard(key(IDS[2]))
    assert [m.tier for m in run(store.get([IDS[2]]))] == [REDIS]


def test_without_redis(s3, blobs):
    store = MemoryStore(release="r1", keys={rid: key(rid) for rid in IDS}, codec=CODEC, shape=SHAPE, store=s3,
                        ram=RamCache(0))
    assert [m.tier for m in run(store.get([IDS[0]]))] == [S3]
    assert [m.tier for m in run(store.get([IDS[0]]))] == [S3]  # no RAM budget either
    assert not {t.tier: t for t in run(store.stats()).tiers}[REDIS].available


@pytest.mark.parametrize(("ids", "error", "message"), [
    ([], InvalidInput, "no ids given"),
    ([IDS[0]] * (MAX_IDS + 1), InvalidInput, f"{MAX_IDS + 1} ids in one request; at most {MAX_IDS}"),
    ([IDS[0], "nope", "nada"], NotFound, "2 of 3 ids are not references of release 'r1': nope, nada"),
    ([f"x{i}" for i in range(8)], NotFound, "x0, x1, x2, x3, x4 and 3 more"),
])
def test_bad_requests(store, s3, ids, error, message):
    with pytest.raises(error, match=message):
        run(store.get(ids))
    assert s3.gets == []


def test_concurrent_requests_share_one_s3_read(store, s3):
    s3.gate = threading.Event()

    async def scenario():
        first = asyncio.create_task(store.get([IDS[0]]))
        second = asyncio.create_task(store.get([IDS[0], IDS[1]]))
        await asyncio.sleep(0.05)  # both are now waiting on S3
        s3.gate.set()
        return await first, await second

    a, b = run(scenario())
    assert a[0].blob == b[0].blob
    assert sorted(s3.gets) == sorted([key(IDS[0]), key(IDS[1])])


def test_a_request_that_checked_ram_before_a_read_ended_does_not_read_again(store, s3, redis):
    """It looked in RAM, then waited for Redis while another request's read ended and left the
    in-flight map: it read S3 a second time (2-2.6 times the reads under a stampede)."""
    real_mget = redis.mget

    async def slow_mget(keys):
        values = await real_mget(keys)  # a miss: read before the first read's fill
        await asyncio.sleep(0.2)  # the rest of the round trip, during which the first read ends
        return values

    s3.gate = threading.Event()

    async def scenario():
        first = asyncio.create_task(store.get([IDS[0]]))
        await asyncio.sleep(0.05)  # the first request's Redis miss is over; it reads S3
        redis.mget = slow_mget
        second = asyncio.create_task(store.get([IDS[0]]))  # RAM misses now, then waits for Redis
        await asyncio.sleep(0.05)
        s3.gate.set()  # the read ends while the second request waits for Redis
        return await first, await second

    a, b = run(scenario())
    assert a[0].blob == b[0].blob and (a[0].tier, b[0].tier) == (S3, RAM)  # RAM's answer, not an S3 read
    assert s3.gets == [key(IDS[0])]


def test_a_read_whose_request_gave_up_still_fills_ram_and_redis(store, s3, redis, blobs):
    """Only the request that started a read filled the caches, Redis after the read ended: past its
    deadline, it left them cold, and the next request, on this replica or another, read S3 again."""
    s3.gate = threading.Event()

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.get([IDS[2]]), 0.1)
        s3.gate.set()
        await asyncio.sleep(0.3)  # the read ends after its request gave up
        await store.filled()
        return await store.get([IDS[2]])

    again = run(scenario())
    assert again[0].tier == RAM and s3.gets == [key(IDS[2])]
    assert redis.data == {key(IDS[2]): blobs[IDS[2]]}


def test_a_reply_does_not_wait_for_redis_to_take_its_memories(store, redis, blobs):
    """A slow Redis (up to its socket timeout per part of a fill) delayed every cold reply."""
    real_set_many, taking = redis.set_many, asyncio.Event

    async def scenario():
        gate = taking()

        async def slow_set_many(items):
            await gate.wait()
            return await real_set_many(items)

        redis.set_many = slow_set_many
        got = await asyncio.wait_for(store.get([IDS[0], IDS[1]]), 2)
        assert [m.tier for m in got] == [S3, S3] and redis.data == {}  # answered, Redis still taking them
        gate.set()
        await store.filled()

    run(scenario())
    assert redis.data == {key(IDS[0]): blobs[IDS[0]], key(IDS[1]): blobs[IDS[1]]}


def test_reads_nobody_waits_for_are_not_started(s3, redis, blobs):
    """Reads whose requests had left stayed queued for the pool's threads: behind them, after an
    overload, requests well within capacity timed out. A read another request still waits for goes on."""
    store = MemoryStore(release="r1", keys={rid: key(rid) for rid in IDS}, codec=CODEC, shape=SHAPE, store=s3,
                        ram=RamCache(1 << 20), redis=None, s3_workers=1)
    s3.gate = threading.Event()

    async def scenario():
        first = asyncio.create_task(store.get([IDS[0]]))  # takes the one thread, held at the gate
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):  # queued behind it, then left
            await asyncio.wait_for(store.get([IDS[1], IDS[2]]), 0.1)
        shared = asyncio.create_task(store.get([IDS[3]]))
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):  # left too, but `shared` still waits for the read
            await asyncio.wait_for(store.get([IDS[3]]), 0.1)
        s3.gate.set()
        done = [await first, await shared]
        await asyncio.sleep(0.1)
        return done, await store.get([IDS[1]])

    (first, shared), later = run(scenario())
    assert (first[0].blob, shared[0].blob) == (blobs[IDS[0]], blobs[IDS[3]])
    assert later[0].tier == S3 and later[0].blob == blobs[IDS[1]]
    assert s3.gets == [key(IDS[0]), key(IDS[3]), key(IDS[1])]  # IDS[2] never read; IDS[1] once, when asked again
    assert not store._inflight


def test_put_validates_then_writes_s3_and_warms_caches(store, s3, redis, blobs):
    new = blob_for(99)
    with pytest.raises(AlreadyExists, match=rf"1 memories .*\({IDS[5]}\): memories are immutable"):
        run(store.put([(IDS[5], new)]))  # the bank's valid blob stays
    assert s3.objects[key(IDS[5])] == blobs[IDS[5]] and key(IDS[5]) not in redis.data
    del s3.objects[key(IDS[5])]  # lost: a repair writes it
    assert run(store.put([(IDS[5], new)])) == 1
    assert s3.objects[key(IDS[5])] == new and redis.data[key(IDS[5])] == new
    assert [m.tier for m in run(store.get([IDS[5]]))] == [RAM]

    with pytest.raises(InvalidInput, match=rf"1 memories are not valid.*{IDS[4]}.*checksum"):
        run(store.put([(IDS[3], blobs[IDS[3]]), (IDS[4], corrupt(new))]))
    assert s3.objects[key(IDS[4])] == blobs[IDS[4]]  # nothing of a bad batch was stored
    with pytest.raises(NotFound, match="not references"):
        run(store.put([("unknown", new)]))
    with pytest.raises(InvalidInput, match="no ids"):
        run(store.put([]))
    s3.down = True
    with pytest.raises(Unavailable, match="to store memories"):
        run(store.put([(IDS[5], new)]))


def test_readiness_asks_for_the_memories_prefix_the_service_reads(store, s3):
    """It asked for the release's manifest alone: credentials allowed to read releases/ but not
    memories/ (a policy per prefix) kept the service ready while every memory read failed."""
    assert run(store.check_s3()) and s3.heads == ["releases/r1/manifest.json", key(IDS[0])]
    s3.denied = ("memories/",)
    assert not run(store.check_s3()) and not store.s3_up
    s3.denied = ("no prefix",)
    del s3.objects[key(IDS[0])]  # a memory missing from the bank: its requests' data loss, not the service's
    assert run(store.check_s3()) and store.s3_up
