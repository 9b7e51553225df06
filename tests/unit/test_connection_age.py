"""Client connections are asked to reconnect at an age, so that a Service's new replicas get calls."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.bench.fault_proxy import DelayProxy
from memory3.services.rpc.server import LIVENESS_SERVICE, Server, ServerOptions


def connections_over(age_s: float | None, seconds: float = 2.0) -> tuple[int, int]:
    """(TCP connections a client opened, calls that failed) calling a server every 0.1 s through a
    proxy, as through a Kubernetes Service: each new connection is one the Service can balance."""
    async def scenario():
        server = Server(port=0, max_connection_age_s=age_s)
        await server.start()
        proxy = DelayProxy("127.0.0.1", server.port).start()
        failed = 0
        try:
            async with grpc.aio.insecure_channel(proxy.endpoint) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for _ in range(round(seconds / 0.1)):
                    try:
                        await stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5)
                    except grpc.aio.AioRpcError:
                        failed += 1
                    await asyncio.sleep(0.1)
            return proxy.connections, failed
        finally:
            proxy.stop()
            await server.stop()

    return asyncio.run(scenario())


def test_an_aged_connection_is_replaced_without_failing_a_call():
    """A client kept its first connection for ever: replicas an autoscaler added got none of its calls."""
    assert connections_over(None) == (1, 0)
    opened, failed = connections_over(0.5)
    assert opened >= 3 and failed == 0


def test_a_connection_age_must_be_positive():
    with pytest.raises(ValueError, match="maximum connection age must be > 0 seconds"):
        ServerOptions(max_connection_age_s=0)
