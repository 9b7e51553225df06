"""The Redis tier under load, on a real redis-server: many concurrent calls, and memories of the
paper's size over a link of ordinary bandwidth. Both marked a healthy Redis down, and memories came
from the object store at the busiest moment."""

import asyncio
import os

import pytest

from memory3.bench.fault_proxy import DelayProxy
from memory3.model.codecs import codec_from_name
from memory3.model.memory_format import paper_bytes_per_memory
from memory3.services.memory.redis_tier import RedisTier

pytestmark = pytest.mark.integration


def test_more_concurrent_calls_than_connections_wait_their_turn(local_redis):
    """Past redis-py's 100 connections its pool raised "Too many connections", which the tier took
    for Redis being down."""
    keys = [f"memories/bank/{i:02x}/{i}" for i in range(5)]

    async def main():
        tier = RedisTier(local_redis.url, socket_timeout=5.0)
        try:
            assert await tier.set_many([(k, os.urandom(1000)) for k in keys])
            replies = await asyncio.gather(*(tier.mget(keys) for _ in range(250)))
            return replies, tier.up
        finally:
            await tier.close()

    replies, up = asyncio.run(main())
    assert up and all(reply is not None and all(replies[0]) for reply in replies)


def test_paper_size_memories_over_a_slower_link_keep_the_tier_up(local_redis):
    """A timeout bounds a whole reply or send: 64 bf16 memories of the paper's shape (29 MB) in one
    MGET cannot cross a link of 60 MB/s in the tier's 0.2 s, and a healthy Redis was marked down."""
    size = paper_bytes_per_memory(codec_from_name("bf16"))
    keys = [f"memories/bank/{i:02x}/{i}" for i in range(64)]
    proxy = DelayProxy("127.0.0.1", local_redis.port, bytes_per_s=60e6).start()

    async def main():
        tier = RedisTier(f"redis://{proxy.endpoint}/0", value_bytes=size)
        try:
            stored = await tier.set_many([(k, os.urandom(size)) for k in keys])
            values = await tier.mget(keys)
            return stored, values, tier.up
        finally:
            await tier.close()

    try:
        stored, values, up = asyncio.run(main())
    finally:
        proxy.stop()
    assert stored and up
    assert values is not None and [len(v) for v in values] == [size] * len(keys)
