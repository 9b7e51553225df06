"""`memory3 serve memory`: the MemoryService with health, reflection, metrics and a graceful drain.

The gRPC server listens at once (NOT_SERVING) and opens the release in the background; health
turns SERVING only when the release is open and its memory bank's store answered. While the
object store is unreachable it keeps retrying with a backoff (a pod waits instead of crash
looping); a release that does not exist or fails its checksums is a configuration error and ends
the service. Redis is optional: without it, or while it is down, memories come from S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from memory3.model.checkpoint import CONFIG_FILE

from ..release.publish import CODEC_FILE, REFERENCES_FILE
from ..release.reader import Release
from ..rpc.errors import Unavailable
from ..rpc.server import Server, ServerOptions, serve_until_signal
from ..storage.object_store import ObjectStore, S3Config, StoreUnavailable
from .engine import MemoryStore
from .ram_cache import RamCache
from .redis_tier import RedisTier
from .servicer import SERVICE, MemoryServicer

log = logging.getLogger("memory3.memory")
# What the service reads of a release: the reference table (id -> bank key), the model config
# (memory shape) and, for VQ, the codec. Never the weights.
MEMORY_FILES = (REFERENCES_FILE, f"model/{CONFIG_FILE}", CODEC_FILE)


@dataclass(frozen=True)
class MemorySettings:
    release: str
    s3: S3Config
    cache_dir: Path
    redis_url: str | None = None  # None: no Redis tier
    # The Redis password apart from the URL (no URL escaping; `serve memory` reads MEMORY3_REDIS_PASSWORD).
    redis_password: str | None = field(default=None, repr=False)
    redis_ttl_s: int = 86400
    ram_cache_bytes: int = 256 << 20
    s3_workers: int = 16
    open_retry_s: float = 1.0  # first wait before retrying an unreachable object store at startup
    open_max_retry_s: float = 15.0

    def __post_init__(self) -> None:
        if self.ram_cache_bytes < 0:
            raise ValueError(f"--ram-cache-mb must be >= 0 (0 disables the RAM tier), got {self.ram_cache_bytes}")
        if self.redis_ttl_s < 0:
            raise ValueError(f"--redis-ttl must be >= 0 seconds (0: no expiry), got {self.redis_ttl_s}")
        if self.s3_workers < 1:
            raise ValueError(f"--s3-workers must be >= 1, got {self.s3_workers}")


class MemoryServer:
    """The running service: its gRPC server, and the store once the release is open."""

    def __init__(self, settings: MemorySettings, server: Server) -> None:
        self.settings, self.server = settings, server
        self.store: MemoryStore | None = None
        self.ready: asyncio.Task[MemoryStore] | None = None

    @property
    def port(self) -> int:
        return self.server.port

    def current(self) -> MemoryStore:
        if self.store is None:
            raise Unavailable(f"the memory service is starting: release {self.settings.release!r} is not open yet; "
                              "retry shortly")
        return self.store

    async def _open(self) -> MemoryStore:
        s = self.settings
        # A request waits for its reads: a hung store fails them after one timeout, not three, and
        # each read thread has its connection (`--s3-workers` of them).
        objects = ObjectStore(s.s3, read_retries=0, connections=max(16, s.s3_workers))
        delay = s.open_retry_s
        while True:
            try:
                release = await asyncio.to_thread(Release.open, objects, s.release, s.cache_dir, only=MEMORY_FILES)
                # Release.open read the manifest from the bank's store: S3 answered.
                store = await asyncio.to_thread(MemoryStore.from_release, release, ram=RamCache(s.ram_cache_bytes),
                                                s3_workers=s.s3_workers,
                                                max_message_bytes=self.server.options.max_message_bytes)
                break
            except StoreUnavailable as e:
                log.warning("release %r not open yet: %s; retrying in %.1fs", s.release, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, s.open_max_retry_s)
        if s.redis_url:
            store.redis = RedisTier(s.redis_url, password=s.redis_password, ttl_s=s.redis_ttl_s)
            if await store.redis.ping():
                await store.redis.check_usable()
                await store.redis.check_policy()
            log.info("Redis tier at %s (%s)", store.redis.where,
                     "up" if store.redis.up else "down for now; reading through to S3")
        self.store = store
        await self.server.serving()
        log.info("release %r open: %d memories, codec %s", s.release, len(store.keys), store.codec.name)
        return store

    async def wait_ready(self, timeout: float | None = None) -> MemoryStore:
        """The open store; raises what made opening fail (e.g. ReleaseNotFound)."""
        return await asyncio.wait_for(asyncio.shield(self.ready), timeout)

    async def close_store(self) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ready
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def stop(self) -> None:
        """NOT_SERVING, in-flight RPCs finish (up to the grace period), then the store closes."""
        await self.server.stop()
        await self.close_store()


async def start_memory_server(settings: MemorySettings, options: ServerOptions | None = None) -> MemoryServer:
    """Listen now (NOT_SERVING); the release opens in the background (`wait_ready`)."""
    server = Server(options or ServerOptions())
    app = MemoryServer(settings, server)
    server.add_service(MemoryServicer(app.current), SERVICE)
    await server.start()
    app.ready = asyncio.create_task(app._open())
    log.info("MemoryService listening on %s:%d", server.options.host, server.port)
    return app


def serve_memory(settings: MemorySettings, options: ServerOptions) -> int:
    async def main() -> None:
        app = await start_memory_server(settings, options)
        print(f"MemoryService on {options.host}:{app.port} (release {settings.release})", flush=True)
        await serve_until_signal(app.server, app.ready, stop=app.stop, close=app.close_store)

    asyncio.run(main())
    return 0
