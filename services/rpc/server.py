"""A grpc.aio server with health, reflection and a graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger("memory3.rpc")
MAX_MESSAGE_BYTES = 64 << 20


class Server:
    """Owns the aio server; `serving()` flips health to SERVING once the service is really ready."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, grace_s: float = 10.0) -> None:
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.grace_s = grace_s
        self.service_names: list[str] = []

    def add(self, register: Callable[[object, grpc.aio.Server], None], servicer: object, service_name: str) -> None:
        register(servicer, self.server)
        self.service_names.append(service_name)

    async def start(self) -> None:
        reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME],
                                            self.server)
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()

    async def serving(self) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, on_drain: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        """NOT_SERVING first (load balancers stop routing), then let in-flight RPCs finish."""
        await self.health.enter_graceful_shutdown()
        for hook in on_drain:
            await hook()
        await self.server.stop(self.grace_s)

    async def run_until_signal(self, on_drain: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining for up to %.0fs", self.grace_s)
        await self.stop(on_drain)
