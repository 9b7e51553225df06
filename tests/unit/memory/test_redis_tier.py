"""RedisTier's failure policy against a port where nothing listens: fast failure, logged once,
skipped during an exponential backoff, and credentials never logged."""

import asyncio
import logging
import time

from memory3.services.memory.redis_tier import KEY_PREFIX, RedisTier, redacted
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


def test_keys_and_redaction():
    assert RedisTier.key("memories/b/ab/abc") == KEY_PREFIX + "memories/b/ab/abc"
    assert redacted("redis://user:pw@cache.example:6380/2") == "redis://cache.example:6380/2"
