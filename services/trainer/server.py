"""`memory3 serve trainer`: the TrainerService with health, reflection and a graceful drain."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..rpc.server import Server
from ..storage.object_store import S3Config
from .engine import TrainingJobManager
from .servicer import SERVICE, TrainerServicer

log = logging.getLogger("memory3.trainer")


async def start_trainer_server(s3: S3Config, work_root: Path, *, host: str = "127.0.0.1", port: int = 0,
                               grace_s: float = 10.0) -> tuple[Server, TrainingJobManager]:
    engine = TrainingJobManager(s3, work_root)
    server = Server(host=host, port=port, grace_s=grace_s)
    server.add_service(TrainerServicer(engine), SERVICE)
    await server.start()
    await engine.start()  # SERVING only once the object store answered
    await server.serving()
    log.info("TrainerService listening on %s:%d", host, server.port)
    return server, engine


def serve_trainer(s3: S3Config, work_root: Path, *, host: str, port: int, grace_s: float) -> int:
    async def main() -> None:
        server, engine = await start_trainer_server(s3, work_root, host=host, port=port, grace_s=grace_s)
        print(f"TrainerService on {host}:{server.port}", flush=True)
        await server.run_until_signal(on_drain=[engine.stop])

    asyncio.run(main())
    return 0
