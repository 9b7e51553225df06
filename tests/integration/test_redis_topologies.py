"""The Redis tier on the topologies production runs, as real redis-server processes on 127.0.0.1:
a primary and replica under Sentinel, failing over; a three-node Cluster, losing a node."""

import asyncio
import time

import pytest
import redis

from memory3.services.memory.redis_tier import RedisTier
from memory3.services.storage.local_redis import LocalRedis, LocalSentinel, start_local_cluster, start_local_redis
from memory3.services.storage.local_s3 import free_port

pytestmark = pytest.mark.integration

BLOBS = [(f"memories/bank/{i:02x}/{i:032x}", bytes([i]) * (100 + i)) for i in range(100)]


async def _until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await condition()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} within {timeout_s}s")


@pytest.fixture
def sentinel_pair(tmp_path):
    primary = start_local_redis(tmp_path / "primary")
    replica = LocalRedis(tmp_path / "replica", free_port(), extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    sentinel = LocalSentinel(tmp_path / "sentinel", free_port(), primary_port=primary.port)
    try:
        replica.start()
        sentinel.start()
        yield primary, replica, sentinel
    finally:
        for server in (sentinel, replica, primary):
            server.stop()


def test_through_sentinel_the_tier_follows_a_failover_to_the_promoted_replica(sentinel_pair):
    primary, replica, sentinel = sentinel_pair
    tier = RedisTier(f"redis+sentinel://127.0.0.1:{sentinel.port}/memory3", backoff_s=0.1, max_backoff_s=0.5)
    keys = [key for key, _ in BLOBS]

    async def scenario():
        assert await tier.set_many(BLOBS)
        assert await tier.mget(keys) == [blob for _, blob in BLOBS]
        with redis.Redis(port=primary.port) as client:
            assert client.wait(1, 5000) == 1  # the replica holds every write
        primary.kill()
        # While Sentinel fails over, the tier is down (callers read the bank); then it reads the new primary.
        values = await _until(lambda: tier.mget(keys), 20, "the tier did not read the promoted replica")
        assert values == [blob for _, blob in BLOBS]
        assert sentinel.primary() == ("127.0.0.1", replica.port) and tier.up
        assert await tier.set_many([("memories/bank/new", b"after the failover")])
        with redis.Redis(port=replica.port) as client:
            assert client.get("memory3:memories/bank/new") == b"after the failover"
        await tier.close()

    asyncio.run(scenario())


@pytest.fixture
def cluster(tmp_path):
    nodes = start_local_cluster(tmp_path)
    yield nodes
    for node in nodes:
        node.stop()


def test_on_a_cluster_memories_spread_over_the_nodes_and_a_lost_node_makes_the_tier_down(cluster):
    tier = RedisTier(f"redis+cluster://127.0.0.1:{cluster[0].port}", backoff_s=0.1)
    keys = [key for key, _ in BLOBS]

    async def scenario():
        assert await tier.set_many(BLOBS)
        sizes = [_dbsize(node.port) for node in cluster]
        assert sum(sizes) == len(BLOBS) and all(size > 0 for size in sizes), sizes
        # Keys in different slots: a plain MGET of them would be refused (CROSSSLOT).
        wanted = [keys[0], "memories/bank/absent", *keys[1:]]
        assert await tier.mget(wanted) == [BLOBS[0][1], None, *(blob for _, blob in BLOBS[1:])]
        await tier.delete(keys[:10])
        assert await tier.mget(keys[:12]) == [None] * 10 + [BLOBS[10][1], BLOBS[11][1]]
        cluster[1].kill()
        started = time.monotonic()
        assert await _until(lambda: _is_down(tier, keys), 10, "a read across the lost node did not fail")
        assert time.monotonic() - started < 10 and not tier.up
        await tier.close()

    asyncio.run(scenario())


def _dbsize(port: int) -> int:
    with redis.Redis(port=port) as client:
        return client.dbsize()


async def _is_down(tier: RedisTier, keys) -> bool:
    return await tier.mget(keys) is None
