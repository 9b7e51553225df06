"""A Redis password with URL-special characters (as `openssl rand -base64` makes them), given apart from
the URL: the memory service's MEMORY3_REDIS_PASSWORD, which the chart sets from the in-chart Redis's Secret."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from memory3.services.memory.redis_tier import RedisTier
from memory3.services.memory.redis_url import PASSWORD_ENV, SENTINEL, parse_redis_url

PASSWORD = "k3J/9x+Qa="

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    from memory3.services.storage.local_redis import start_local_redis

    server = start_local_redis(tmp_path_factory.mktemp("redis"), password=PASSWORD)
    try:
        yield server
    finally:
        server.stop()


def test_a_password_apart_from_the_url_needs_no_escaping(redis_with_password):
    tier = RedisTier(f"redis://127.0.0.1:{redis_with_password.port}/0", password=PASSWORD, socket_timeout=2.0)

    async def scenario():
        try:
            assert await tier.ping()
            assert await tier.set_many([("k", b"value")])
            assert await tier.mget(["k"]) == [b"value"]
        finally:
            await tier.close()

    asyncio.run(scenario())
    assert PASSWORD not in tier.where and PASSWORD not in repr(tier.target)


def test_the_same_password_inside_the_url_is_what_breaks():
    with pytest.raises(ValueError, match="Port could not be cast"):
        parse_redis_url(f"redis://:{PASSWORD}@127.0.0.1:6379/0")


def test_a_wrong_password_is_refused(redis_with_password):
    tier = RedisTier(f"redis://127.0.0.1:{redis_with_password.port}/0", password="wrong", socket_timeout=2.0)

    async def scenario():
        try:
            return await tier.ping()
        finally:
            await tier.close()

    assert asyncio.run(scenario()) is False


def test_the_url_password_wins_and_sentinel_urls_take_it_too():
    assert parse_redis_url("redis+sentinel://h:26379/m", password=PASSWORD).password == PASSWORD
    assert parse_redis_url("redis+sentinel://:inurl@h:26379/m", password=PASSWORD).password == "inurl"
    assert parse_redis_url("redis+sentinel://h:26379/m", password=PASSWORD).mode == SENTINEL
    assert parse_redis_url("redis://:inurl@h:6379/0", password=PASSWORD).password is None  # redis-py reads the URL
    assert parse_redis_url("redis://h:6379/0", password=PASSWORD).password == PASSWORD


def test_serve_memory_reads_the_password_from_the_environment(monkeypatch, tmp_path):
    """The entry point reads it, as it reads the URL; the settings never show it."""
    from memory3.services.cli.main import main
    from memory3.services.memory import server

    started = []
    monkeypatch.setattr(server, "serve_memory", lambda settings, options: started.append(settings) or 0)
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "a")
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", "s")
    argv = ["serve", "memory", "--release", "r", "--s3-endpoint", "127.0.0.1:9", "--redis-url", "redis://h:6379/0",
            "--cache-dir", str(tmp_path), "--port", "0"]
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    assert main(argv) == 0
    monkeypatch.delenv(PASSWORD_ENV)
    assert main(argv) == 0
    assert [s.redis_password for s in started] == [PASSWORD, None]
    assert PASSWORD not in repr(started[0])
