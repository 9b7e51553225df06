"""MemoryService over real gRPC, a real redis-server and a real S3 server (rclone): tiers, fills,
faults (Redis killed and restarted, S3 down), corruption in either store, bad requests, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.model.memory_format import decode_memory
from memory3.services.memory import redis_tier
from memory3.services.memory.client import MemoryClient
from memory3.services.memory.redis_tier import KEY_PREFIX
from memory3.services.memory.server import MemorySettings, start_memory_server
from memory3.services.release.manifest import MANIFEST_FILE, ReleaseNotFound, release_key
from memory3.services.release.memory_ids import MEMORY_IDS_FILE
from memory3.services.release.publish import REFERENCES_FILE
from memory3.services.rpc.errors import DataLoss, InvalidInput, NotFound, Unavailable
from memory3.services.rpc.server import ServerOptions
from memory3.services.storage.local_s3 import free_port, start_local_s3
from memory3.v1 import memory_service_pb2 as pb
from memory3.v1 import memory_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
SERVICE = "memory3.v1.MemoryService"


def settings(random_release, s3_config, tmp_path, redis_url=None, **overrides) -> MemorySettings:
    fields = {"redis_ttl_s": 60, "ram_cache_bytes": 1 << 20, **overrides}
    return MemorySettings(release=random_release.name, s3=s3_config, cache_dir=tmp_path / "releases",
                          redis_url=redis_url, **fields)


@contextlib.asynccontextmanager
async def serving(memory_settings: MemorySettings, *, ready: bool = True, options: ServerOptions | None = None):
    app = await start_memory_server(memory_settings, options)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        if ready:
            await app.wait_ready(timeout=60)
        yield app, MemoryClient(channel, timeout_s=10)
    finally:
        await channel.close()
        await app.stop()


async def health(app) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        return reply.status


def tiers(stats: pb.GetStatsResponse) -> dict[str, tuple[int, int, bool]]:
    return {pb.Tier.Name(t.tier): (t.hits, t.misses, t.available) for t in stats.tiers}


def scrape(port: int, name: str, tier: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f'{name}{{tier="{tier}"}}')]
    return values[0] if values else 0.0  # a labelled series appears on its first use


def corrupted(blob: bytes) -> bytes:
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x5A
    return bytes(bad)


def test_miss_goes_to_s3_then_redis_then_ram(random_release, local_s3, store, local_redis, tmp_path):
    ids = [r.id for r in random_release.references[:3]]
    cache = redis.Redis.from_url(local_redis.url)

    async def scenario():
        base = settings(random_release, local_s3.config, tmp_path, local_redis.url)
        async with serving(base, options=ServerOptions(metrics_port=0)) as (a, client_a), \
                serving(dataclasses.replace(base, cache_dir=tmp_path / "b")) as (_b, client_b):
            assert await health(a) == health_pb2.HealthCheckResponse.SERVING
            redis_hits = await asyncio.to_thread(scrape, a.server.metrics_port, "memory3_memory_hits_total", "redis")

            first = await client_a.fetch([ids[0], ids[1], ids[0]])
            await a.store.filled()  # Redis takes them after the reply
            assert [(m.id, m.tier) for m in first] == [(ids[0], "s3"), (ids[1], "s3"), (ids[0], "s3")]
            c = random_release.model.config
            shape = (len(c.memory_layers), c.n_kv_head, c.mem_tokens_per_head, c.head_dim)
            for m in first:  # the stored blob, byte for byte, and it decodes to the release's shape
                assert m.blob == store.get_bytes(random_release.memory_key(m.id))
                decode_memory(m.blob, random_release.memory_codec, expected_shape=shape)
            key = KEY_PREFIX + random_release.memory_key(ids[0])
            assert cache.get(key) == first[0].blob and 0 < cache.ttl(key) <= 60  # one key, whole blob, TTL

            # another replica shares Redis: its first read is a Redis hit, its second a RAM hit
            assert [m.tier for m in await client_b.fetch(ids[:2])] == ["redis", "redis"]
            assert [m.tier for m in await client_b.fetch([ids[1], ids[2], ids[0]])] == ["ram", "s3", "ram"]
            assert await client_a.get(ids[:2]) == [first[0].blob, first[1].blob]

            stats_b = await client_b.stats()
            assert stats_b.release == random_release.name and stats_b.ram_entries == 3 and stats_b.ram_bytes > 0
            got = tiers(stats_b)
            assert (got["TIER_RAM"][:2], got["TIER_REDIS"][:2], got["TIER_S3"][:2]) == ((2, 3), (2, 1), (1, 0))
            assert all(available for *_, available in got.values())
            assert tiers(await client_a.stats())["TIER_S3"][:2] == (2, 0)
            after = await asyncio.to_thread(scrape, a.server.metrics_port, "memory3_memory_hits_total", "redis")
            assert after - redis_hits == 2  # process-wide counters, served on /metrics

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_redis_killed_then_restarted(random_release, local_s3, local_redis, tmp_path):
    ids = [r.id for r in random_release.references]

    async def scenario():
        no_ram = settings(random_release, local_s3.config, tmp_path, local_redis.url, ram_cache_bytes=0)
        async with serving(no_ram) as (app, client):
            await client.fetch(ids[:2])
            await app.store.filled()
            assert [m.tier for m in await client.fetch(ids[:2])] == ["redis", "redis"]

            local_redis.kill()
            for _ in range(3):  # every request is served, from S3, without waiting on Redis
                started = time.perf_counter()
                assert [m.tier for m in await client.fetch(ids[:3])] == ["s3", "s3", "s3"]
                assert time.perf_counter() - started < 2.0
            assert tiers(await client.stats())["TIER_REDIS"][2] is False

            local_redis.start()  # same port, empty (no persistence)
            deadline = time.monotonic() + 15
            while not tiers(await client.stats())["TIER_REDIS"][2]:
                assert time.monotonic() < deadline, "Redis tier never came back"
                await asyncio.sleep(0.1)
            assert [m.tier for m in await client.fetch([ids[3]])] == ["s3"]
            await app.store.filled()
            assert [m.tier for m in await client.fetch([ids[3]])] == ["redis"]  # filled and used again

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_corrupt_object_in_s3_is_data_loss(random_release, local_s3, store, local_redis, tmp_path):
    victim, fine = random_release.references[4].id, random_release.references[5].id
    key = random_release.memory_key(victim)
    original = store.get_bytes(key)
    store.put_bytes(key, corrupted(original))
    cache = redis.Redis.from_url(local_redis.url)

    async def scenario():
        async with serving(settings(random_release, local_s3.config, tmp_path, local_redis.url)) as (app, client):
            with pytest.raises(DataLoss, match=rf"corrupt.*{victim}.*checksum mismatch"):
                await client.fetch([fine, victim])
            assert cache.get(KEY_PREFIX + key) is None and key not in app.store.ram  # never cached
            assert [m.tier for m in await client.fetch([fine])] == ["ram"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pb_grpc.MemoryServiceStub(channel).GetMemories(pb.GetMemoriesRequest(ids=[victim]))
            assert err.value.code() == grpc.StatusCode.DATA_LOSS

            store.put_bytes(key, original)  # repaired in the bank: served again
            assert (await client.get([victim])) == [original]

    try:
        asyncio.run(scenario())
    finally:
        store.put_bytes(key, original)


def test_corrupt_value_in_redis_is_replaced_from_s3(random_release, local_s3, store, local_redis, tmp_path):
    rid = random_release.references[6].id
    key = KEY_PREFIX + random_release.memory_key(rid)
    cache = redis.Redis.from_url(local_redis.url)
    good = store.get_bytes(random_release.memory_key(rid))
    cache.set(key, corrupted(good))

    async def scenario():
        no_ram = settings(random_release, local_s3.config, tmp_path, local_redis.url, ram_cache_bytes=0)
        async with serving(no_ram) as (app, client):
            [m] = await client.fetch([rid])
            await app.store.filled()
            assert (m.tier, m.blob) == ("s3", good)
            assert cache.get(key) == good  # repaired
            assert [m.tier for m in await client.fetch([rid])] == ["redis"]

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_batch_order_across_mget_pieces(random_release, local_s3, store, local_redis, tmp_path, monkeypatch):
    monkeypatch.setattr(redis_tier, "MGET_KEYS", 5)  # 12 references: three MGETs in one pipeline
    ids = [r.id for r in random_release.references][::-1]
    expected = [store.get_bytes(random_release.memory_key(i)) for i in ids]

    async def scenario():
        no_ram = settings(random_release, local_s3.config, tmp_path, local_redis.url, ram_cache_bytes=0)
        async with serving(no_ram) as (app, client):
            assert [m.tier for m in await client.fetch(ids)] == ["s3"] * len(ids)
            await app.store.filled()
            again = await client.fetch(ids)
            assert [m.tier for m in again] == ["redis"] * len(ids)
            assert [m.id for m in again] == ids and [m.blob for m in again] == expected

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_bad_requests(random_release, local_s3, tmp_path):
    known = random_release.references[0].id

    async def scenario():
        async with serving(settings(random_release, local_s3.config, tmp_path)) as (app, client):
            with pytest.raises(NotFound, match="2 of 3 ids are not references of release 'random-tiny': nope, nada"):
                await client.fetch([known, "nope", "nada"])
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                raw = pb_grpc.MemoryServiceStub(channel)
                for ids, code, message in [([known] * 1025, grpc.StatusCode.INVALID_ARGUMENT, "at most 1024"),
                                           ([], grpc.StatusCode.INVALID_ARGUMENT, "no ids given"),
                                           (["nope"], grpc.StatusCode.NOT_FOUND, "nope"),
                                           # an id past gRPC's header limit, quoted short
                                           (["n" * 1_000_000], grpc.StatusCode.NOT_FOUND, "n" * 80 + "…")]:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await raw.GetMemories(pb.GetMemoriesRequest(ids=ids))
                    assert err.value.code() == code and message in err.value.details()
            with pytest.raises(InvalidInput, match="no ids"):
                await client.fetch([])
            # the client splits a large batch; the service never sees more than 1024
            blobs = await client.get([known] * 1500)
            assert len(blobs) == 1500 and len(set(blobs)) == 1
            # Redis not configured: reported unavailable, memories still served
            assert tiers(await client.stats())["TIER_REDIS"][2] is False

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_put_memories_validates_and_stores(random_release, local_s3, store, local_redis, tmp_path):
    rid = random_release.references[7].id
    key = random_release.memory_key(rid)
    blob = store.get_bytes(key)

    async def scenario():
        async with serving(settings(random_release, local_s3.config, tmp_path, local_redis.url)) as (_app, client):
            assert await client.put([(rid, blob)]) == 1
            assert redis.Redis.from_url(local_redis.url).get(KEY_PREFIX + key) == blob
            assert [m.tier for m in await client.fetch([rid])] == ["ram"]
            with pytest.raises(InvalidInput, match=f"not valid blobs.*{rid}"):
                await client.put([(rid, corrupted(blob))])
            with pytest.raises(NotFound):
                await client.put([("nope", blob)])
        assert store.get_bytes(key) == blob

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_put_memories_repairs_the_bank_but_never_replaces_a_valid_memory(random_release, local_s3, store,
                                                                        tmp_path):
    """Memories are immutable: another valid blob under a stored id is refused (other replicas and
    releases sharing the bank hold it; the reference table's digest says it is not that id's); a
    missing or corrupt one is written. (A release without digests: ALREADY_EXISTS, test_engine.py.)"""
    rid, other = (random_release.references[i].id for i in (8, 9))
    key = random_release.memory_key(rid)
    blob, other_blob = store.get_bytes(key), store.get_bytes(random_release.memory_key(other))
    assert blob != other_blob

    async def scenario():
        async with serving(settings(random_release, local_s3.config, tmp_path)) as (_app, client):
            with pytest.raises(InvalidInput, match=rf"1 memories .*: {rid}; first: .*its sha256 differs"):
                await client.put([(other, other_blob), (rid, other_blob)])
            assert store.get_bytes(key) == blob
            assert [m.blob for m in await client.fetch([rid])] == [blob]

            store.put_bytes(key, corrupted(blob))
            assert await client.put([(rid, blob)]) == 1
            assert store.get_bytes(key) == blob

            store.remove_keys([key])
            assert await client.put([(rid, blob), (other, other_blob)]) == 2
            assert store.get_bytes(key) == blob

    try:
        asyncio.run(asyncio.wait_for(scenario(), 90))
    finally:
        store.put_bytes(key, blob)


def test_not_serving_until_s3_answers_then_unavailable_when_it_goes(random_release, local_s3, tmp_path):
    port = free_port()
    late = dataclasses.replace(local_s3.config, endpoint=f"127.0.0.1:{port}", timeout_s=2.0)
    ids = [r.id for r in random_release.references[:2]]

    async def scenario():
        s = settings(random_release, late, tmp_path, open_retry_s=0.1, open_max_retry_s=0.2)
        async with serving(s, ready=False) as (app, client):
            await asyncio.sleep(0.3)  # a few failed attempts to open the release
            assert await health(app) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(Unavailable, match="starting"):
                await client.fetch(ids)

            second = await asyncio.to_thread(start_local_s3, local_s3.data_dir, port=port, bucket=late.bucket,
                                             access_key=late.access_key, secret_key=late.secret_key)
            try:
                await app.wait_ready(timeout=30)
                assert await health(app) == health_pb2.HealthCheckResponse.SERVING
                await client.fetch(ids[:1])
            finally:
                second.stop()
            assert [m.tier for m in await client.fetch(ids[:1])] == ["ram"]  # cached memories still served
            with pytest.raises(Unavailable, match="object store cannot be reached"):
                await client.fetch(ids)
            assert tiers(await client.stats())["TIER_S3"][2] is False

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_missing_release_never_becomes_ready(local_s3, tmp_path):
    async def scenario():
        s = MemorySettings(release="no-such-release", s3=local_s3.config, cache_dir=tmp_path)
        async with serving(s, ready=False) as (app, _client):
            with pytest.raises(ReleaseNotFound, match="does not exist"):
                await app.wait_ready(timeout=30)
            assert await health(app) == health_pb2.HealthCheckResponse.NOT_SERVING

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_cli_serves_and_drains_on_sigterm(random_release, local_s3, local_redis, tmp_path):
    port = free_port()
    env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": local_s3.config.access_key,
           "MEMORY3_S3_SECRET_KEY": local_s3.config.secret_key, "MEMORY3_REDIS_URL": local_redis.url}
    process = subprocess.Popen(
        [sys.executable, "-m", "memory3.services.cli.main", "serve", "memory", "--release", random_release.name,
         "--port", str(port), "--s3-endpoint", local_s3.config.endpoint, "--s3-bucket", local_s3.config.bucket,
         "--cache-dir", str(tmp_path), "--ram-cache-mb", "8", "--grace", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async def until_served() -> bytes:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        status = await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                        if status.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.aio.AioRpcError:
                        pass
                    assert process.poll() is None, process.communicate()[1][-2000:]
                    assert time.monotonic() < deadline, "memory3 serve memory never became SERVING"
                    await asyncio.sleep(0.2)
                return await MemoryClient(channel).get([random_release.references[0].id])

        [blob] = asyncio.run(until_served())
        assert blob.startswith(b"M3KV")
        os.kill(process.pid, signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err[-2000:]
        assert local_s3.config.secret_key not in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_memory_pod_downloads_the_ids_not_the_texts(random_release, local_s3, store, tmp_path):
    """The reference table's texts are tens of GB at the design's size; the ids and digests a pod
    needs are `memory_ids.npy`. A release without one (a table naming keys apart) is read from its table."""
    ids = [r.id for r in random_release.references[:3]]
    assert MEMORY_IDS_FILE in random_release.manifest.files
    without = dataclasses.replace(random_release, name="no-memory-ids")
    files = {f: meta for f, meta in random_release.manifest.files.items() if f != MEMORY_IDS_FILE}
    for file in files:
        data = store.get_bytes(release_key(random_release.name, file))
        store.put_bytes(release_key(without.name, file), data)
    manifest = dataclasses.replace(random_release.manifest, name=without.name, files=files)
    store.put_bytes(release_key(without.name, MANIFEST_FILE), manifest.to_json().encode())

    async def scenario():
        for release, downloaded in ((random_release, MEMORY_IDS_FILE), (without, REFERENCES_FILE)):
            cache = tmp_path / release.name
            async with serving(dataclasses.replace(settings(release, local_s3.config, tmp_path), cache_dir=cache)) \
                    as (app, client):
                assert [m.blob for m in await client.fetch(ids)] == [
                    store.get_bytes(random_release.memory_key(i)) for i in ids]
                with pytest.raises(NotFound):
                    await client.fetch(["0" * 32])
                assert len(app.store.keys) == len(random_release.references)
                assert set(app.store.digests) == set(app.store.keys)  # every memory is checked by its sha256
            kept = {p.name for p in (cache / release.name).iterdir()}
            assert downloaded in kept and ({MEMORY_IDS_FILE, REFERENCES_FILE} - {downloaded}).isdisjoint(kept)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 90))
    finally:
        store.remove_keys(store.list_keys(release_key(without.name, "")))


def test_a_client_of_another_memory_bank_gets_unavailable_not_other_memories(random_release, local_s3, tmp_path):
    """A release retrained on the same knowledge has the same reference ids and memories of the
    same shape, made by other weights: a decoder pointed at its memory service (a rolling upgrade,
    a wrong address) took them as its own."""
    ids = [r.id for r in random_release.references[:2]]
    bank = random_release.manifest.memory_bank["bank"]

    async def scenario():
        async with serving(settings(random_release, local_s3.config, tmp_path)) as (app, _), \
                grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            assert len(await MemoryClient(channel, bank=bank).get(ids)) == 2
            with pytest.raises(Unavailable, match=f"memory bank {bank} is not this model's \\(0123abcd\\)"):
                await MemoryClient(channel, bank="0123abcd").get(ids)

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_a_redis_that_refuses_the_tiers_commands(random_release, local_s3, local_redis, tmp_path):
    """Redis that answers but refuses (an ACL without memory3:* keys, a read-only replica): every
    request was INTERNAL, health SERVING. At start it is a configuration error that says what to
    fix; later on, the tier counts as down and S3 answers."""
    admin = redis.Redis.from_url(local_redis.url)
    admin.execute_command("ACL", "SETUSER", "app", "on", ">app-pw", "~app:*", "+@all")
    admin.execute_command("ACL", "SETUSER", "svc", "on", ">svc-pw", "~memory3:*", "+@all")
    port = local_redis.port
    ids = [r.id for r in random_release.references[:3]]

    async def scenario():
        refused = settings(random_release, local_s3.config, tmp_path, f"redis://app:app-pw@127.0.0.1:{port}")
        app = await start_memory_server(refused)
        try:
            with pytest.raises(ValueError, match=r"refuses the memory tier.s commands on memory3:\* keys \(this user "):
                await app.wait_ready(timeout=60)
        finally:
            await app.stop()

        usable = settings(random_release, local_s3.config, tmp_path, f"redis://svc:svc-pw@127.0.0.1:{port}",
                          ram_cache_bytes=0)
        async with serving(usable) as (app, client):
            assert [m.tier for m in await client.fetch(ids[:1])] == ["s3"]
            await app.store.filled()
            assert [m.tier for m in await client.fetch(ids[:1])] == ["redis"]
            admin.execute_command("ACL", "SETUSER", "svc", "resetkeys", "~app:*")  # revoked while serving
            assert [m.tier for m in await client.fetch(ids)] == ["s3", "s3", "s3"]
            assert tiers(await client.stats())["TIER_REDIS"][2] is False
            assert await health(app) == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_a_request_asks_for_what_one_reply_carries_and_the_client_splits_by_it(random_release, local_s3, tmp_path):
    """1024 ids a request passed the check, while 64 MiB carries 148 memories at the paper's size:
    the reply failed RESOURCE_EXHAUSTED after every read was done."""
    from memory3.model.memory_format import memory_size
    from memory3.services.memory.engine import ids_per_reply

    limit = (1 << 20) + 20_000
    blob = memory_size(random_release.model.config.memory_shape,
                       random_release.memory_codec, random_release.model.config.ref_len)
    fits = ids_per_reply(blob, limit)
    ids = [r.id for r in random_release.references] * 4
    assert 1 < fits < len(ids)

    async def scenario():
        async with serving(settings(random_release, local_s3.config, tmp_path),
                           options=ServerOptions(max_message_bytes=limit)) as (app, client):
            with pytest.raises(InvalidInput, match=f"at most {fits} \\(as many of this release's memories as one "
                                                   "reply carries\\)"):
                await client.fetch(ids)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                split = await MemoryClient(channel, max_ids=fits).fetch(ids)
            assert [m.id for m in split] == ids

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_a_valid_memory_under_another_id_is_caught_and_only_the_right_one_repairs_it(random_release, local_s3, store,
                                                                                      tmp_path):
    """Each blob was checked for itself only: swapped objects were served (and cached) as each
    other's memories, and a repair could store one reference's memory under another's id."""
    victim, other = random_release.references[8].id, random_release.references[9].id
    key = random_release.memory_key(victim)
    right, wrong = store.get_bytes(key), store.get_bytes(random_release.memory_key(other))
    store.put_bytes(key, wrong)

    async def scenario():
        async with serving(settings(random_release, local_s3.config, tmp_path)) as (_, client):
            with pytest.raises(DataLoss, match=f"not {victim}'s: its sha256 differs"):
                await client.fetch([victim])
            with pytest.raises(InvalidInput, match="not .*'s: its sha256 differs"):
                await client.put([(victim, wrong)])
            assert await client.put([(victim, right)]) == 1
            assert await client.get([victim]) == [right]

    try:
        asyncio.run(asyncio.wait_for(scenario(), 90))
    finally:
        store.put_bytes(key, right)


async def health_of(app, name: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name))).status


async def until_health(app, status: int, what: str, wait_s: float = 30) -> None:
    deadline = time.monotonic() + wait_s
    while await health(app) != status:
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def test_readiness_follows_the_stores_once_open(random_release, local_s3, local_redis, tmp_path):
    """Once open, the service stayed SERVING whatever became of S3: with Redis down too, a load
    balancer kept sending it requests it could only fail. Now it is NOT_SERVING while neither S3
    nor Redis answers (Redis up alone still serves the hot memories), SERVING again when one does;
    liveness stays SERVING throughout."""
    port = free_port()
    own = dataclasses.replace(local_s3.config, endpoint=f"127.0.0.1:{port}", timeout_s=2.0)
    ids = [r.id for r in random_release.references[:3]]

    def own_s3():
        return start_local_s3(local_s3.data_dir, port=port, bucket=own.bucket, access_key=own.access_key,
                              secret_key=own.secret_key)

    async def scenario():
        s3 = await asyncio.to_thread(own_s3)
        s = settings(random_release, own, tmp_path, local_redis.url, ram_cache_bytes=0, health_interval_s=0.05)
        try:
            async with serving(s) as (app, client):
                await client.fetch(ids[:1])
                await app.store.filled()  # now in Redis
                await asyncio.to_thread(s3.stop)
                deadline = time.monotonic() + 30
                while tiers(await client.stats())["TIER_S3"][2]:  # the readiness check saw S3 go
                    assert time.monotonic() < deadline, "S3's outage never seen"
                    await asyncio.sleep(0.05)
                assert await health(app) == health_pb2.HealthCheckResponse.SERVING  # Redis answers
                assert [m.tier for m in await client.fetch(ids[:1])] == ["redis"]

                local_redis.kill()
                await until_health(app, health_pb2.HealthCheckResponse.NOT_SERVING, "still SERVING with no store")
                assert await health_of(app, "liveness") == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(Unavailable, match="object store cannot be reached"):
                    await client.fetch(ids[1:2])

                s3 = await asyncio.to_thread(own_s3)  # no request reaches the service: it asks on its own
                await until_health(app, health_pb2.HealthCheckResponse.SERVING, "never SERVING again")
                assert tiers(await client.stats())["TIER_S3"][2] is True
                assert [m.tier for m in await client.fetch(ids[1:2])] == ["s3"]
        finally:
            s3.stop()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_redis_user_without_ping_is_a_usable_tier(random_release, local_s3, local_redis, tmp_path):
    """An ACL user granted what the tier's error message asks for (GET, SET, MGET, DEL on memory3:*)
    but not PING made the service end at start with redis-py's NoPermissionError, and GetStats fail
    INTERNAL: a refused PING is an answer, so the tier is up and used. Its calls get 2 s
    (`--redis-timeout`): under a loaded machine the user's first connection took longer than 0.2 s."""
    admin = redis.Redis.from_url(local_redis.url)
    admin.execute_command("ACL", "SETUSER", "narrow", "on", ">narrow-pw", "~memory3:*",
                          "+get", "+set", "+mget", "+del")
    ids = [r.id for r in random_release.references[:2]]

    async def scenario():
        narrow = settings(random_release, local_s3.config, tmp_path,
                          f"redis://narrow:narrow-pw@127.0.0.1:{local_redis.port}", ram_cache_bytes=0,
                          redis_timeout_s=2.0)
        async with serving(narrow) as (app, client):
            kwargs = app.store.redis.client.connection_pool.connection_kwargs
            assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (2.0, 2.0)
            assert [m.tier for m in await client.fetch(ids)] == ["s3", "s3"]
            await app.store.filled()
            assert [m.tier for m in await client.fetch(ids)] == ["redis", "redis"]
            assert tiers(await client.stats())["TIER_REDIS"][2] is True
            assert await health(app) == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(asyncio.wait_for(scenario(), 90))
