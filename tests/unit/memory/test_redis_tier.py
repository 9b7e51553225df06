"""RedisTier's failure policy against a port where nothing listens: fast failure, logged once,
skipped during an exponential backoff, and credentials never logged."""

import asyncio
import logging
import time

import pytest

from memory3.services.memory.redis_tier import KEY_PREFIX, RedisTier
from memory3.services.memory.redis_url import CLUSTER, SENTINEL, SERVER, parse_redis_url
from memory3.services.storage.local_s3 import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_down_tier_fails_fast_logs_once_and_backs_off(caplog):
    clock = Clock()
    tier = RedisTier(f"redis://:secret@127.0.0.1:{free_port()}/0", backoff_s=1.0, max_backoff_s=3.0, clock=clock)

    async def scenario():
        started = time.perf_counter()
        assert await tier.mget(["a"]) is None
        assert time.perf_counter() - started < 1.0  # no multi-second client retries
        assert not tier.up and not tier.should_try()
        assert await tier.mget(["a"]) is None  # skipped: no connection attempt during the backoff
        clock.now = 1.0
        assert tier.should_try()
        assert await tier.set_many([("a", b"x")]) is False  # the retry fails: backoff doubles
        clock.now = 2.5
        assert not tier.should_try()
        clock.now = 3.0
        assert tier.should_try()
        assert await tier.ping() is False
        clock.now = 5.9
        assert not tier.should_try()  # capped at max_backoff_s = 3
        clock.now = 6.0
        assert tier.should_try()
        await tier.close()

    with caplog.at_level(logging.WARNING, logger="memory3.memory"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0]
    assert "secret" not in caplog.text


def test_calls_failing_together_back_off_as_one_failure():
    """Every call in flight when Redis went down doubled the backoff: eight at once took it from 0.5 s
    to the 10 s maximum. One failure, and one failed retry, double it once each."""
    clock = Clock()
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0", backoff_s=1.0, max_backoff_s=100.0, clock=clock)

    async def scenario():
        assert await asyncio.gather(*(tier.mget([f"k{i}"]) for i in range(8))) == [None] * 8
        clock.now = 0.99
        assert not tier.should_try()
        clock.now = 1.0
        assert tier.should_try()  # the first backoff, not 2**7 of it
        assert await asyncio.gather(*(tier.set_many([(f"k{i}", b"x")]) for i in range(4))) == [False] * 4
        clock.now = 2.99
        assert not tier.should_try()
        clock.now = 3.0
        assert tier.should_try()  # the retries failed: doubled once, to 2 s
        assert await tier.ping() is False
        clock.now = 6.99
        assert not tier.should_try()
        clock.now = 7.0
        assert tier.should_try()
        await tier.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("url", [f"redis+sentinel://:secret@127.0.0.1:{free_port()}/memory3",
                                 f"redis+cluster://:secret@127.0.0.1:{free_port()}"])
def test_a_sentinel_or_cluster_nobody_answers_for_is_down_at_once(url, caplog):
    tier = RedisTier(url, backoff_s=1.0, clock=Clock())

    async def scenario():
        started = time.perf_counter()
        assert await tier.mget(["a"]) is None
        assert await tier.set_many([("a", b"x")]) is False
        assert time.perf_counter() - started < 2.0
        assert not tier.up
        await tier.close()

    with caplog.at_level(logging.WARNING, logger="memory3.memory"):
        asyncio.run(scenario())
    assert "unavailable" in caplog.text and "secret" not in caplog.text


def test_keys_and_redaction():
    assert RedisTier.key("memories/b/ab/abc") == KEY_PREFIX + "memories/b/ab/abc"
    assert parse_redis_url("redis://user:pw@cache.example:6380/2").redacted() == "redis://cache.example:6380/2"
    sentinel = parse_redis_url("redis+sentinel://:pw@s1:26380,s2/cache/3?sentinel_password=spw")
    assert (sentinel.mode, sentinel.hosts, sentinel.service, sentinel.db) == (
        SENTINEL, (("s1", 26380), ("s2", 26379)), "cache", 3)
    assert (sentinel.password, sentinel.sentinel_password) == ("pw", "spw")
    assert sentinel.redacted() == "redis+sentinel://s1:26380,s2:26379/cache/3"
    cluster = parse_redis_url("rediss+cluster://default:pw@n1:7000,n2:7001")
    assert (cluster.mode, cluster.hosts, cluster.tls, cluster.username) == (
        CLUSTER, (("n1", 7000), ("n2", 7001)), True, "default")
    assert "pw" not in repr(cluster) + repr(sentinel) + cluster.redacted()
    assert parse_redis_url("rediss://cache:6380/0").mode == SERVER


@pytest.mark.parametrize(("url", "message"), [
    ("http://cache:6379", "the scheme must be one of redis://"),
    ("cache:6379", "the scheme must be one of"),
    ("redis://:6379/0", "no host"),
    ("redis+sentinel://s1:26379", "name the Sentinel service"),
    ("redis+sentinel://s1/cache/zero", "database 'zero' is not a number"),
    ("redis+cluster://n1/0", "takes no path"),
    ("redis+cluster://n1:70000", "port '70000' of n1"),
    ("redis+cluster://n1,,n2", "an empty host"),
    ("redis+cluster://n1?sentinel_password=x", "unknown option 'sentinel_password'"),
])
def test_a_redis_url_it_cannot_use_says_what_to_fix(url, message):
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_a_redis_that_stops_answering_during_the_start_probe_is_down_not_fatal(caplog):
    """PING answered, then the probe timed out: the exception ended the service's start, though
    Redis is never a dependency."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    class AnswersPingOnly:
        async def info(self, section):
            return {"cluster_enabled": 0}

        async def set(self, *args, **kwargs):
            raise RedisTimeoutError("Timeout reading from socket")

    tier = RedisTier(f"redis://127.0.0.1:{free_port()}", socket_timeout=0.05, clock=Clock())
    tier.client = AnswersPingOnly()
    with caplog.at_level(logging.WARNING, logger="memory3.memory"):
        asyncio.run(tier.check_usable())
    assert not tier.up and "unavailable (probe" in caplog.text
