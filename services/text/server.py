"""`memory3 serve text`: the TextService with health, reflection, metrics and a graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from pathlib import Path

from ..retrieval.index import IndexShard
from ..rpc.server import Server, ServerOptions, serve_until_signal
from ..storage.object_store import ObjectStore, S3Config
from .engine import TextEngine
from .servicer import SERVICE, TextServicer

log = logging.getLogger("memory3.text")


async def listen_text_server(engine: TextEngine, options: ServerOptions) -> tuple[Server, asyncio.Task]:
    """Listen at once (health NOT_SERVING), and load the release in a background task that reports
    SERVING once it is loaded (and one embedding has run); until then calls answer UNAVAILABLE."""
    server = Server(options)
    server.add_service(TextServicer(engine), SERVICE)
    await server.start()
    log.info("TextService listening on %s:%d, loading its release", options.host, server.port)

    async def load() -> None:
        await engine.start()
        await server.serving()
        log.info("TextService serving release %r", engine.release)
    return server, asyncio.create_task(load())


async def start_text_server(engine: TextEngine, options: ServerOptions) -> Server:
    """`listen_text_server`, returned once the release is loaded. If loading fails the server is
    stopped and the error raised."""
    server, loading = await listen_text_server(engine, options)
    try:
        await loading
    except BaseException:
        loading.cancel()
        await server.stop()
        raise
    return server


async def run_text_server(engine: TextEngine, options: ServerOptions) -> None:
    """Serve until SIGTERM/SIGINT, which are handled from the start, while the release loads too (as
    the memory service and the decoder do): a signal then stops the server without a traceback."""
    server, loading = await listen_text_server(engine, options)

    async def ready() -> None:
        await loading
        where = f"{options.host}:{server.port}"
        metrics = f", metrics on :{server.metrics_port}" if server.metrics_port is not None else ""
        part = f" (index shard {engine.shard})" if engine.shard.count > 1 else ""
        print(f"TextService on {where} serving release {engine.release!r}{part}{metrics}", flush=True)

    async def close() -> None:
        if not loading.done():
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading

    await serve_until_signal(server, asyncio.create_task(ready()), stop=server.stop, close=close)


def serve_text(s3: S3Config, release: str, cache_dir: Path, options: ServerOptions, *,
               max_overlap: float, max_concurrency: int, embedder_dtype: str = "float32",
               shard: IndexShard = IndexShard(0, 1)) -> int:
    from ..retrieval.embedder import Embedder

    async def main() -> None:
        engine = TextEngine.for_release(ObjectStore(s3), release, cache_dir, max_overlap=max_overlap,
                                        max_concurrency=max_concurrency, shard=shard,
                                        embedder_factory=functools.partial(Embedder, dtype=embedder_dtype))
        log.info("query embeddings in %s", embedder_dtype)
        await run_text_server(engine, options)

    asyncio.run(main())
    return 0
