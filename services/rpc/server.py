"""A grpc.aio server with health, reflection, metrics, optional TLS and token auth, an optional
plaintext health-only port, and a graceful drain on SIGTERM/SIGINT. Every service is started through it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .metrics import RPC_HANDLED, start_metrics_server
from .registration import add_service

log = logging.getLogger("memory3.rpc")
MAX_MESSAGE_BYTES = 64 << 20
# Health and reflection stay open without a token: probes and grpcurl's listing need them.
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# A health name that is SERVING from start until shutdown, whatever the service's readiness, unless the
# service cannot work again without a restart (`Server.not_live`): liveness probes check it, so a pod
# whose dependency is down stops getting traffic but is not restarted, and a decoder whose device failed is.
LIVENESS_SERVICE = "liveness"


@dataclass(frozen=True)
class ServerOptions:
    """How a service listens; parsed once from flags/env at the entry point."""

    host: str = "127.0.0.1"
    port: int = 0
    grace_s: float = 10.0
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    tls_cert: Path | None = None  # PEM server certificate (chain); with tls_key enables TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA; when set, clients must present a certificate it signed (mTLS)
    auth_token: str | None = None  # when set, RPCs need metadata `authorization: Bearer <token>`
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # A second, plaintext listener serving only grpc.health.v1.Health (the same states as the main port), for
    # probes that cannot speak TLS (Kubernetes' `grpc:` probes). None: none; 0: any free port.
    health_port: int | None = None
    # Clients keep one connection to a Service's address and send every call over it, so replicas
    # added by an autoscaler got none of an existing client's calls. A connection is told to go
    # (GOAWAY) at this age: the calls on it finish, and the client's next ones go over a new
    # connection, which the Service balances. None: connections live as long as their clients.
    max_connection_age_s: float | None = 60.0

    def __post_init__(self) -> None:
        if self.max_connection_age_s is not None and not self.max_connection_age_s > 0:
            raise ValueError(f"the maximum connection age must be > 0 seconds, got {self.max_connection_age_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("client certificate checking (--tls-client-ca) needs TLS (--tls-cert, --tls-key)")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("the auth token must not be empty")
        if self.health_port is not None and self.health_port != 0 and self.health_port == self.port:
            raise ValueError(f"the health port (--health-port) must differ from the service port ({self.port})")


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects RPCs without the shared bearer token (UNAUTHENTICATED), in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(_OPEN_METHODS):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        return _denying(handler, method.rsplit("/", 1)[-1])


_DENIED = "missing or wrong token: send metadata 'authorization: Bearer <token>'"


def _denying(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED (counted, as every
    answer is: clients sending a wrong token show on the services' dashboards)."""

    async def unary_response(request, context):
        RPC_HANDLED.labels(method=method, code="UNAUTHENTICATED").inc()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def stream_response(request, context):
        RPC_HANDLED.labels(method=method, code="UNAUTHENTICATED").inc()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream_response, **kwargs)


def _listen(add_port: Callable[[], int], address: str) -> int:
    """The port `add_port` bound; OSError naming the address where it could not (in use, or not an
    address of this host), which gRPC reports as 0 or as a RuntimeError, by version."""
    try:
        port = add_port()
    except RuntimeError as e:
        raise OSError(f"could not listen on {address}: is another server using it? ({e})") from None
    if port == 0:
        raise OSError(f"could not listen on {address}: is another server using it?")
    return port


class Server:
    """Owns the aio server; `serving()` flips health to SERVING once the service is really ready."""

    def __init__(self, options: ServerOptions | None = None, **overrides) -> None:
        self.options = options = ServerOptions(**overrides) if options is None else options
        interceptors = [TokenAuthInterceptor(options.auth_token)] if options.auth_token else []
        # No SO_REUSEPORT (gRPC's default): a second server on a port in use would start without a
        # word and take a share of the first one's connections.
        channel_options = [("grpc.max_receive_message_length", options.max_message_bytes),
                           ("grpc.max_send_message_length", options.max_message_bytes), ("grpc.so_reuseport", 0)]
        if options.max_connection_age_s is not None:  # calls in flight keep their connection (no age grace)
            channel_options.append(("grpc.max_connection_age_ms", round(options.max_connection_age_s * 1000)))
        self.server = grpc.aio.server(interceptors=interceptors, options=channel_options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{options.host}:{options.port}"
        if options.tls_cert is not None:
            credentials = grpc.ssl_server_credentials(
                [(options.tls_key.read_bytes(), options.tls_cert.read_bytes())],
                root_certificates=options.tls_client_ca.read_bytes() if options.tls_client_ca else None,
                require_client_auth=options.tls_client_ca is not None,
            )
            self.port = _listen(lambda: self.server.add_secure_port(address, credentials), address)
        else:
            self.port = _listen(lambda: self.server.add_insecure_port(address), address)
        # Health only, no interceptors, no reflection: nothing else is reachable without TLS.
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        if options.health_port is not None:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            health_address = f"{options.host}:{options.health_port}"
            self.health_port = _listen(lambda: self.health_server.add_insecure_port(health_address),
                                       f"{health_address} (health port)")
        self.grace_s = options.grace_s
        self.metrics_port: int | None = None
        self.service_names: list[str] = []

    def add_service(self, servicer: object, service: ServiceDescriptor) -> None:
        """Register from the proto descriptor: undecodable requests get INVALID_ARGUMENT, not INTERNAL."""
        add_service(self.server, servicer, service)
        self.service_names.append(service.full_name)

    async def start(self) -> None:
        reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME],
                                            self.server)
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.options.metrics_port is not None:
            self.metrics_port = start_metrics_server(self.options.host, self.options.metrics_port)

    async def serving(self) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        """Readiness lost (a dependency went away); in-flight RPCs continue."""
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def not_live(self) -> None:
        """The service can serve nothing until its process restarts: not ready, and not live, so that
        a liveness probe has it restarted. For good: nothing sets it back."""
        await self.not_serving()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, on_drain: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        """NOT_SERVING first (load balancers stop routing), then let in-flight RPCs finish: the drain
        hooks and the server's own wait share one grace period, which the pod's termination grace
        period is sized from (the chart), so that RPCs still going at its end get a status."""
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        for hook in on_drain:
            await hook()
        await self.server.stop(max(0.0, deadline - loop.time()))
        if self.health_server is not None:  # probes see NOT_SERVING until the drain is over
            await self.health_server.stop(0)

    async def run_until_signal(self, on_drain: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        """Until SIGTERM/SIGINT, then `stop` (the drain). A second signal cuts the drain short: the
        RPCs still going end UNAVAILABLE at once (an operator's second Ctrl-C, a supervisor's
        second SIGTERM), instead of after the grace period."""
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
        await signalled.wait()
        signalled.clear()
        log.info("signal received: draining for up to %.0fs (a second signal stops now)", self.grace_s)
        await self.stop_unless(signalled, on_drain)

    async def stop_unless(self, cut: asyncio.Event,
                          on_drain: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        """`stop(on_drain)`, unless `cut` is set first: then the drain is abandoned, and the server
        stops without waiting."""
        drain = asyncio.ensure_future(self.stop(on_drain))
        cutting = asyncio.ensure_future(cut.wait())
        await asyncio.wait({drain, cutting}, return_when=asyncio.FIRST_COMPLETED)
        cutting.cancel()
        if drain.done():
            drain.result()
            return
        log.info("signal received again: stopping now; the RPCs still going are cut")
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await self.server.stop(0)
        if self.health_server is not None:
            await self.health_server.stop(0)


async def serve_until_signal(server: Server, ready: asyncio.Task, *, stop: Callable[[], Awaitable[None]],
                             close: Callable[[], Awaitable[None]],
                             on_drain: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
    """Run a service whose start-up (`ready`) goes on in the background until SIGTERM/SIGINT.

    A start-up failure (a release that does not exist, a corrupt one) stops the server and is
    raised, so the process exits non-zero instead of staying up NOT_SERVING forever.
    """
    until_signal = asyncio.create_task(server.run_until_signal(on_drain=on_drain))
    await asyncio.wait({until_signal, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        until_signal.cancel()
        await stop()
        raise ready.exception()
    await until_signal
    await close()


def client_channel(address: str, *, tls_ca: Path | None = None, client_cert: Path | None = None,
                   client_key: Path | None = None, auth_token: str | None = None,
                   max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """An aio channel to one of our services, with the same TLS/token options the server takes."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if tls_ca is None and auth_token is None:
        return grpc.aio.insecure_channel(address, options=options)
    if tls_ca is None:
        raise ValueError("a token is only sent over TLS: give the server's CA too")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls_ca.read_bytes(),
        private_key=client_key.read_bytes() if client_key else None,
        certificate_chain=client_cert.read_bytes() if client_cert else None,
    )
    if auth_token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(auth_token))
    return grpc.aio.secure_channel(address, credentials, options=options)
