"""`memory3 serve text`: the TextService with health, reflection, metrics and a graceful drain."""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

from ..retrieval.index import IndexShard
from ..rpc.server import Server, ServerOptions
from ..storage.object_store import ObjectStore, S3Config
from .engine import TextEngine
from .servicer import SERVICE, TextServicer

log = logging.getLogger("memory3.text")


async def start_text_server(engine: TextEngine, options: ServerOptions) -> Server:
    """Listen at once (health NOT_SERVING), load the release, then report SERVING.

    Until the release, the embedder and the index are loaded (and one embedding has run), calls
    answer UNAVAILABLE. If loading fails the server is stopped and the error raised.
    """
    server = Server(options)
    server.add_service(TextServicer(engine), SERVICE)
    await server.start()
    log.info("TextService listening on %s:%d, loading its release", options.host, server.port)
    try:
        await engine.start()
    except BaseException:
        await server.stop()
        raise
    await server.serving()
    log.info("TextService serving release %r", engine.release)
    return server


def serve_text(s3: S3Config, release: str, cache_dir: Path, options: ServerOptions, *,
               max_overlap: float, max_concurrency: int, embedder_dtype: str = "float32",
               shard: IndexShard = IndexShard(0, 1)) -> int:
    from ..retrieval.embedder import Embedder

    async def main() -> None:
        engine = TextEngine.for_release(ObjectStore(s3), release, cache_dir, max_overlap=max_overlap,
                                        max_concurrency=max_concurrency, shard=shard,
                                        embedder_factory=functools.partial(Embedder, dtype=embedder_dtype))
        log.info("query embeddings in %s", embedder_dtype)
        server = await start_text_server(engine, options)
        where = f"{options.host}:{server.port}"
        metrics = f", metrics on :{server.metrics_port}" if server.metrics_port is not None else ""
        part = f" (index shard {shard})" if shard.count > 1 else ""
        print(f"TextService on {where} serving release {release!r}{part}{metrics}", flush=True)
        await server.run_until_signal()

    asyncio.run(main())
    return 0
