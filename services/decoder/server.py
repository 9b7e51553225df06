"""`memory3 serve decoder`: the GenerationService with health, reflection, metrics and a drain.

The server listens at once (NOT_SERVING), opens the release (weights, tokenizer, conventions)
and starts the engine in the background, then waits until the text and memory services answer
their health checks. Only then does it report SERVING. A watcher keeps health honest: with the
"fail" retrieval policy the decoder is NOT_SERVING while a dependency is down.

Without --text-address/--memory-address the decoder retrieves in-process from the release (its
index, embedder and memory bank): one process, no Redis tier; handy for a single machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE

from ..memory.client import MemoryClient
from ..memory.engine import release_ids_per_reply
from ..release.publish import CODEC_FILE, TOKENIZER_KEY
from ..release.reader import Release
from ..rpc.errors import ServiceError, Unavailable, with_code
from ..rpc.server import MAX_MESSAGE_BYTES, Server, ServerOptions, client_channel, serve_until_signal
from ..storage.object_store import ObjectStore, S3Config, StoreUnavailable
from ..text.client import ShardedTextClient, TextClient
from .engine import EngineConfig, GenerationEngine
from .remote import RemoteRetrieval, decoded_memory_cache
from .retrieval import CoalescingRetrieval, LocalRetrieval
from .servicer import SERVICE, GenerationServicer

log = logging.getLogger("memory3.decoder")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DependencyOptions:
    """How the decoder calls the text and memory services."""

    tls_ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    auth_token: str | None = None
    timeout_s: float = 5.0


@dataclass(frozen=True)
class DecoderSettings:
    release: str
    s3: S3Config
    cache_dir: Path
    # host:port of the text service, or of each index shard's, comma-separated; None with
    # memory_address: in-process retrieval
    text_address: str | None = None
    memory_address: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    device: str = "cpu"
    dtype: str = "float32"
    dependencies: DependencyOptions = field(default_factory=DependencyOptions)
    watch_interval_s: float = 2.0
    memory_cache_bytes: int = 256 << 20  # the decoder's RAM tier of decoded memories (0: none)

    def __post_init__(self) -> None:
        if self.memory_cache_bytes < 0:
            raise ValueError(f"--memory-cache-mb must be >= 0 (0 disables the decoder's memory cache), "
                             f"got {self.memory_cache_bytes / (1 << 20):g}")
        if (self.text_address is None) != (self.memory_address is None):
            raise ValueError("give both --text-address and --memory-address, or neither (in-process retrieval)")
        shards = self.text_addresses
        if any(not a for a in shards) or len(set(shards)) < len(shards):
            raise ValueError(f"--text-address {self.text_address!r}: give host:port, or one host:port per index "
                             "shard, comma-separated, each once")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def text_addresses(self) -> list[str]:
        """The text service's address, or each index shard's."""
        return [a.strip() for a in self.text_address.split(",")] if self.text_address else []


@dataclass
class BuiltEngine:
    """A started engine over a release, and the dependency channels it owns (closed with it)."""

    engine: GenerationEngine
    health: dict[str, health_pb2_grpc.HealthStub]  # empty with in-process retrieval
    channels: list[grpc.aio.Channel]
    memory: MemoryClient | None = None  # with remote retrieval
    retrieving: bool = True  # whether the services serve retrieval, as last seen (`wait_for_dependencies`)

    async def dependencies_up(self) -> bool:
        """Whether the text and memory services answer SERVING (always true in-process)."""
        for name, stub in self.health.items():
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                log.debug("%s service not serving", name)
                return False
        return True

    async def retrieval_problem(self) -> str | None:
        """Why retrieval through these services cannot work, or None: one retrieval of a chunk of
        nothing, which every text shard answers at once with its release and shard, and the memory
        service's stats, which name its release. Both calls carry the decoder's token, where the
        health checks carry none. Shards that do not make one index (an address given twice, a shard
        count that differs), a service of another release, or one that refuses the decoder's token left
        the decoder ready while every request failed (the memory service's with NOT_FOUND or
        UNAUTHENTICATED, as if the client had asked wrong)."""
        if not self.health:
            return None  # in-process: the release's own index
        # Past any batching of the engine's calls (CoalescingRetrieval.inner): its latency estimate is the
        # engine's requests', which this call, answered at once, would skew.
        retrieval = getattr(self.engine.retrieval, "inner", self.engine.retrieval)
        try:
            await retrieval.retrieve([[self.engine.codec.bos_id]], 1, False)
        except ServiceError as e:  # Unavailable, or an address that is no text service (UNIMPLEMENTED)
            return str(e)
        if self.memory is not None:
            try:
                served = (await self.memory.stats()).release
            except ServiceError as e:
                return f"the memory service does not answer the decoder ({with_code(e)})"
            if served != self.engine.release:
                return (f"the memory service serves release {served!r}, this decoder {self.engine.release!r}: "
                        f"point --memory-address at a memory service of {self.engine.release!r}")
        return None

    async def close(self) -> None:
        await self.engine.close()
        for channel in self.channels:
            await channel.close()


# What a decoder with remote retrieval reads of its release: the model and, for VQ, the codec. The
# index and the reference table, the largest files at scale, are the text and memory services'.
REMOTE_RETRIEVAL_FILES = (f"model/{CONFIG_FILE}", f"model/{WEIGHTS_FILE}", TOKENIZER_KEY, CODEC_FILE)


def open_release(settings: DecoderSettings) -> Release:
    """Download (or reuse the verified local copy of) the release; blocking, one attempt."""
    only = REMOTE_RETRIEVAL_FILES if settings.text_address is not None else None
    return Release.open(ObjectStore(settings.s3), settings.release, settings.cache_dir, only=only)


async def build_engine(settings: DecoderSettings, release: Release) -> BuiltEngine:
    """Weights, tokenizer and retrieval of an opened release, as a started engine.

    Shared by the gRPC server and the KServe model so both serve a release the same way. Call it
    from the event loop that will serve requests: the engine and the dependency channels bind to it.
    """
    s = settings
    model = await asyncio.to_thread(release.load_model, s.device)
    model = model.to(DTYPES[s.dtype])
    codec = release.text_codec()
    health: dict[str, health_pb2_grpc.HealthStub] = {}
    channels: list[grpc.aio.Channel] = []
    if s.text_address is not None:
        d = s.dependencies
        for address in (s.memory_address, *s.text_addresses):
            channels.append(client_channel(address, tls_ca=d.tls_ca, client_cert=d.client_cert,
                                           client_key=d.client_key, auth_token=d.auth_token))
        memory_channel, *text_channels = channels
        health = {"memory": health_pb2_grpc.HealthStub(memory_channel)}
        texts = [TextClient(channel, timeout_s=d.timeout_s) for channel in text_channels]
        for i, channel in enumerate(text_channels):
            health["text" if len(texts) == 1 else f"text (index shard {i} of {len(texts)})"] = \
                health_pb2_grpc.HealthStub(channel)
        memory = MemoryClient(memory_channel, timeout_s=d.timeout_s, bank=release.manifest.memory_bank["bank"],
                              max_ids=release_ids_per_reply(release, MAX_MESSAGE_BYTES))
        retrieval = RemoteRetrieval(texts[0] if len(texts) == 1 else ShardedTextClient(texts), memory,
                                    release.memory_codec(), release.memory_shape(),
                                    cache=decoded_memory_cache(s.memory_cache_bytes), release=release.name)
    else:
        from ..retrieval.embedder import Embedder

        embedder = await asyncio.to_thread(Embedder)
        retrieval = LocalRetrieval(release, embedder)
        memory = None
    engine = GenerationEngine(model, codec, CoalescingRetrieval(retrieval), s.engine, release=release.name)
    try:
        await engine.start()
    except BaseException:
        for channel in channels:
            await channel.close()
        raise
    return BuiltEngine(engine, health, channels, memory)


async def wait_for_dependencies(built: BuiltEngine, stopping: Callable[[], bool] = lambda: False, *,
                                policy: str = "fail") -> bool:
    """Wait until the text and memory services answer SERVING, and the text services answer a retrieval
    as the shards of this decoder's release (`BuiltEngine.retrieval_problem`); False if `stopping()`
    turned true first. A server told to stop while a dependency is still down must not wait for it forever.

    Under the "continue" retrieval policy a service that does not answer is not waited for: requests
    are served without memory meanwhile, and a decoder started during their outage (a scale-up, a
    rescheduled pod) would otherwise never turn ready, and be restarted by its startup probe until they
    came back. Services that answer but refuse this decoder (another release, token or shard count)
    are a deployment's mistake, waited for under either policy. `built.retrieving` says which.
    """
    said = None
    while True:
        if await built.dependencies_up():
            problem = await built.retrieval_problem()
            if problem is None:
                built.retrieving = True
                return not stopping()
        else:
            problem = "the text and memory services do not report SERVING yet"
            if policy == "continue":
                log.warning("serving without memory until the text and memory services answer "
                            "(--retrieval-policy continue): %s", problem)
                built.retrieving = False
                return not stopping()
        if stopping():
            return False
        if problem != said:  # once per change: a rollout can take minutes
            log.warning("waiting for the text and memory services: %s", problem)
            said = problem
        await asyncio.sleep(0.5)


async def watch_readiness(settings: DecoderSettings, built: BuiltEngine, report: Callable[[bool], Awaitable[None]],
                          on_dead: Callable[[], Awaitable[None]] | None = None) -> None:
    """Readiness follows the engine's health and, with the fail-fast policy, the dependencies.

    Starts once they answered (ready); `report(up)` on each change, until cancelled. A request would
    fail while a dependency is down or while the model's passes keep failing, so a load balancer
    should send it elsewhere. An engine that can serve nothing until the process restarts (a device
    fault, a stuck or stopped scheduler) is reported once to `on_dead` (else as not ready), and the
    watch ends: KServe#6259's and vLLM's "healthy while the engine is dead".
    """
    serving = True
    while True:
        await asyncio.sleep(settings.watch_interval_s)
        engine = built.engine
        if engine.draining:
            continue
        dead = engine.dead()
        if dead is not None:
            log.error("the decoder's engine cannot serve any more: %s", dead)
            await (on_dead() if on_dead is not None else report(False))
            return
        why = engine.failing()
        if settings.engine.retrieval_policy == "fail":
            if why is None and not await built.dependencies_up():
                why = "the text or memory service does not answer"
        elif built.health:  # readiness stays; what retrieval does is said once per change
            problem = None if await built.dependencies_up() else "the text or memory service does not answer"
            if problem is None and not built.retrieving:  # back: a real retrieval, only then (it is one)
                problem = await built.retrieval_problem()
            if (problem is None) != built.retrieving:
                built.retrieving = problem is None
                if problem is None:
                    log.warning("the text and memory services serve this decoder: retrieval is on")
                else:
                    log.warning("serving without memory (--retrieval-policy continue): %s", problem)
        if (why is None) != serving:
            serving = why is None
            if serving:
                log.warning("the decoder is ready again (SERVING)")
            else:
                log.warning("%s: the decoder is not ready (NOT_SERVING)", why)
            await report(serving)


class DecoderServer:
    def __init__(self, settings: DecoderSettings, server: Server) -> None:
        self.settings, self.server = settings, server
        self.engine: GenerationEngine | None = None
        self.ready: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._built: BuiltEngine | None = None

    @property
    def port(self) -> int:
        return self.server.port

    def current(self) -> GenerationEngine:
        if self.engine is None or not self.engine.started:
            raise Unavailable("the decoder is starting (loading its release); retry shortly")
        return self.engine

    async def _open_release(self) -> Release:
        s = self.settings
        delay = 1.0
        while True:
            try:
                return await asyncio.to_thread(open_release, s)
            except StoreUnavailable as e:
                log.warning("release %r not open yet: %s; retrying in %.0fs", s.release, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)

    async def _start(self) -> GenerationEngine:
        s = self.settings
        release = await self._open_release()
        built = await build_engine(s, release)
        self._built = built
        self.engine = built.engine
        await wait_for_dependencies(built, policy=s.engine.retrieval_policy)
        await self.server.serving()
        self._watch = asyncio.create_task(watch_readiness(s, built, self._report_readiness, self.server.not_live))
        log.info("decoder serving release %r (%s retrieval, batch %d)", release.name,
                 "remote" if built.health else "in-process", s.engine.max_batch)
        return built.engine

    async def _report_readiness(self, up: bool) -> None:
        await (self.server.serving() if up else self.server.not_serving())

    async def wait_ready(self, timeout: float | None = None) -> GenerationEngine:
        return await asyncio.wait_for(asyncio.shield(self.ready), timeout)

    async def drain(self) -> None:
        """New requests are refused; in-flight streams finish within the grace period."""
        if self.engine is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.engine.stop(), self.server.grace_s)

    async def close(self) -> None:
        for task in (self._watch, self.ready):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._built is not None:
            await self._built.close()

    async def stop(self) -> None:
        await self.server.stop(on_drain=[self.drain])
        await self.close()


async def start_decoder_server(settings: DecoderSettings, options: ServerOptions | None = None) -> DecoderServer:
    """Listen now (NOT_SERVING); the release and the engine start in the background (`wait_ready`)."""
    server = Server(options or ServerOptions())
    app = DecoderServer(settings, server)
    server.add_service(GenerationServicer(app.current), SERVICE)
    await server.start()
    app.ready = asyncio.create_task(app._start())
    log.info("GenerationService listening on %s:%d", server.options.host, server.port)
    return app


def serve_decoder(settings: DecoderSettings, options: ServerOptions) -> int:
    async def main() -> None:
        app = await start_decoder_server(settings, options)
        print(f"GenerationService on {options.host}:{app.port} (release {settings.release})", flush=True)
        await serve_until_signal(app.server, app.ready, stop=app.stop, close=app.close, on_drain=[app.drain])

    asyncio.run(main())
    return 0
