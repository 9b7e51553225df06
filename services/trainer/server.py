"""`memory3 serve trainer`: the TrainerService with health, reflection and a graceful drain."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..rpc.server import Server, ServerOptions
from ..storage.object_store import S3Config
from .engine import MAX_KNOWLEDGE_BYTES, TrainingJobManager
from .servicer import SERVICE, TrainerServicer

log = logging.getLogger("memory3.trainer")


async def start_trainer_server(s3: S3Config, work_root: Path, options: ServerOptions | None = None, *,
                               device: str | None = None) -> tuple[Server, TrainingJobManager]:
    """The TrainerService listening with `options` (TLS, token, metrics, as every service), SERVING
    once the object store answered."""
    options = options or ServerOptions()
    # A knowledge job may carry MAX_KNOWLEDGE_BYTES of documents: the message around them must pass, so
    # that one over the limit gets the answer that says to split it, not the transport's refusal.
    options = dataclasses.replace(options, max_message_bytes=max(options.max_message_bytes,
                                                                 MAX_KNOWLEDGE_BYTES + (4 << 20)))
    engine = TrainingJobManager(s3, work_root, device=device)
    server = Server(options)
    server.add_service(TrainerServicer(engine), SERVICE)
    await server.start()
    await engine.start()
    await server.serving()
    log.info("TrainerService listening on %s:%d", options.host, server.port)
    return server, engine


def drain_hooks(engine: TrainingJobManager, options: ServerOptions) -> list[Callable[[], Awaitable[None]]]:
    """What SIGTERM runs before the server's own wait: the jobs are cancelled and their children get
    what is left of the one grace period (`Server.stop`) to clean up."""
    return [functools.partial(engine.stop, grace_s=options.grace_s)]


def serve_trainer(s3: S3Config, work_root: Path, options: ServerOptions, *, device: str | None = None) -> int:
    async def main() -> None:
        server, engine = await start_trainer_server(s3, work_root, options, device=device)
        metrics = f", metrics on :{server.metrics_port}" if server.metrics_port is not None else ""
        print(f"TrainerService on {options.host}:{server.port}{metrics}", flush=True)
        await server.run_until_signal(on_drain=drain_hooks(engine, options))

    asyncio.run(main())
    return 0
