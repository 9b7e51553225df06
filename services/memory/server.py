"""`memory3 serve memory`: the MemoryService with health, reflection, metrics and a graceful drain.

The gRPC server listens at once (NOT_SERVING) and opens the release in the background; health
turns SERVING only when the release is open and its memory bank's store answered. While the
object store is unreachable it keeps retrying with a backoff (a pod waits instead of crash
looping); a release that does not exist or fails its checksums is a configuration error and ends
the service. Redis is optional: without it, or while it is down, memories come from S3.

Once open, readiness keeps following the stores (`MemoryStore.answers`, every
`health_interval_s`): NOT_SERVING while neither S3 nor a Redis tier answers, since every request
for a memory outside the RAM tier would fail there; SERVING again when one does. S3 down with
Redis up stays SERVING: Redis holds the hot memories. Liveness (the `liveness` health name) is
not touched: a pod whose stores are down leaves its Service and is not restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from memory3.model.checkpoint import CONFIG_FILE

from ..release.memory_ids import MEMORY_IDS_FILE
from ..release.publish import CODEC_FILE
from ..release.reader import Release
from ..rpc.errors import Unavailable
from ..rpc.server import Server, ServerOptions, serve_until_signal
from ..storage.object_store import ObjectStore, S3Config, StoreUnavailable
from .engine import MemoryStore, release_blob_bytes
from .ram_cache import RamCache
from .redis_tier import RedisTier
from .servicer import SERVICE, MemoryServicer

log = logging.getLogger("memory3.memory")
# What the service reads of a release: its ids and their memories' sha256 (the reference table,
# downloaded only where a release has no `memory_ids.npy`), the model config (memory shape) and,
# for VQ, the codec. Never the weights, nor the texts.
MEMORY_FILES = (MEMORY_IDS_FILE, f"model/{CONFIG_FILE}", CODEC_FILE)


@dataclass(frozen=True)
class MemorySettings:
    release: str
    s3: S3Config
    cache_dir: Path
    redis_url: str | None = None  # None: no Redis tier
    # The Redis password apart from the URL (no URL escaping; `serve memory` reads MEMORY3_REDIS_PASSWORD).
    redis_password: str | None = field(default=None, repr=False)
    redis_ttl_s: int = 86400
    # Bounds each Redis call (connect, send, reply): short, so that a slow Redis costs a fetch little
    # more than its S3 read; longer for a Redis far from the pods.
    redis_timeout_s: float = 0.2
    ram_cache_bytes: int = 256 << 20
    s3_workers: int = 16
    open_retry_s: float = 1.0  # first wait before retrying an unreachable object store at startup
    open_max_retry_s: float = 15.0
    health_interval_s: float = 5.0  # how often readiness asks the stores once the release is open

    def __post_init__(self) -> None:
        if self.ram_cache_bytes < 0:
            raise ValueError(f"--ram-cache-mb must be >= 0 (0 disables the RAM tier), "
                             f"got {self.ram_cache_bytes / (1 << 20):g}")
        if self.redis_ttl_s < 0:
            raise ValueError(f"--redis-ttl must be >= 0 seconds (0: no expiry), got {self.redis_ttl_s}")
        if not 0.05 <= self.redis_timeout_s <= 60:
            raise ValueError(f"--redis-timeout must be between 0.05 and 60 seconds, got {self.redis_timeout_s:g} "
                             "(a call carries up to 4 MiB of memories: 0.05 s needs 80 MB/s to Redis)")
        if self.s3_workers < 1:
            raise ValueError(f"--s3-workers must be >= 1, got {self.s3_workers}")
        if not self.health_interval_s > 0:
            raise ValueError(f"the health check interval must be > 0 seconds, got {self.health_interval_s}")


class MemoryServer:
    """The running service: its gRPC server, and the store once the release is open."""

    def __init__(self, settings: MemorySettings, server: Server) -> None:
        self.settings, self.server = settings, server
        self.store: MemoryStore | None = None
        self.ready: asyncio.Task[MemoryStore] | None = None
        self._watch: asyncio.Task[None] | None = None

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
            store.redis = RedisTier(s.redis_url, password=s.redis_password, ttl_s=s.redis_ttl_s,
                                    socket_timeout=s.redis_timeout_s,
                                    value_bytes=release_blob_bytes(release))
            if await store.redis.ping():
                await store.redis.check_usable()
                await store.redis.check_policy()
            log.info("Redis tier at %s (%s)", store.redis.where,
                     "up" if store.redis.up else "down for now; reading through to S3")
        self.store = store
        await self.server.serving()
        self._watch = asyncio.create_task(self._follow_stores(store))
        log.info("release %r open: %d memories, codec %s", s.release, len(store.keys), store.codec.name)
        return store

    async def _follow_stores(self, store: MemoryStore) -> None:
        """Readiness follows whether the stores can answer (`MemoryStore.answers`), until cancelled."""
        serving = True
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                up = await store.answers()
            except Exception:  # noqa: BLE001 - one probe's surprise must not end readiness checks for good
                log.exception("readiness check of the stores failed; counted as not answering")
                up = False
            if up != serving:
                serving = up
                log.warning("the memory service is %s", "ready again (SERVING): a store answers" if up else
                            "not ready (NOT_SERVING): neither the object store nor Redis answers")
                await (self.server.serving() if up else self.server.not_serving())

    async def wait_ready(self, timeout: float | None = None) -> MemoryStore:
        """The open store; raises what made opening fail (e.g. ReleaseNotFound)."""
        return await asyncio.wait_for(asyncio.shield(self.ready), timeout)

    async def close_store(self) -> None:
        for task in (self._watch, self.ready):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
