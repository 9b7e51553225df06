"""The gRPC server plumbing every service shares: shutdown, connection age, listening addresses."""

import asyncio
import contextlib
import os
import signal
import socket
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.bench.fault_proxy import DelayProxy
from memory3.services.rpc.server import LIVENESS_SERVICE, Server, ServerOptions


async def how_it_ends(call) -> grpc.StatusCode:
    """The status a streaming call ends with, once read to its end."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def watched_server(grace_s: float):
    """A started server with `grace_s`, and a health Watch on it: an RPC in flight until the server
    cancels it."""
    server = Server(port=0, grace_s=grace_s)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE))
        await watch.read()
        yield server, watch


def test_the_drain_hooks_and_the_servers_wait_share_one_grace_period():
    """The decoder's drain hook waited up to the grace period, then the server waited as long again
    for RPCs still going: they were cut at twice --grace, after the pod's termination grace period
    (sized from one) had killed the process without a status."""
    grace, hook_s = 2.0, 1.8

    async def scenario():
        async with watched_server(grace) as (server, watch):
            async def slow_drain():
                await asyncio.sleep(hook_s)

            start = time.monotonic()
            await server.stop(on_drain=[slow_drain])
            took = time.monotonic() - start
            return took, await how_it_ends(watch)

    took, code = asyncio.run(scenario())
    assert grace <= took < grace + 1.0, took  # once: hook_s + grace before
    assert code == grpc.StatusCode.UNAVAILABLE  # the RPC still going was cancelled with a status


def test_a_second_signal_cuts_the_drain_short():
    """The first SIGTERM drains (up to the grace period); a second one stops at once, and the RPCs
    still going end with a status. Before, the second signal was ignored until the grace ran out."""
    grace = 30.0

    async def scenario():
        async with watched_server(grace) as (server, watch):
            draining = asyncio.Event()

            async def endless_drain():
                draining.set()
                await asyncio.sleep(grace)

            running = asyncio.ensure_future(server.run_until_signal(on_drain=[endless_drain]))
            await asyncio.sleep(0.1)
            start = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(draining.wait(), 5)
            assert not running.done()
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(running, grace)
            took = time.monotonic() - start
            return took, await how_it_ends(watch)

    took, code = asyncio.run(scenario())
    assert took < 5.0, took
    assert code == grpc.StatusCode.UNAVAILABLE


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


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_host_in_brackets_serves_grpc_and_metrics():
    """"[::]", the form gRPC takes, was given as is to the metrics server, which refused it: with
    metrics on (as the chart always runs), no host worked on an IPv6-only cluster."""
    async def scenario():
        server = Server(host="[::1]", port=0, metrics_port=0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"[::1]:{server.port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5)
            metrics = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://[::1]:{server.metrics_port}/metrics", timeout=5).status)
            return reply.status, metrics
        finally:
            await server.stop()

    assert asyncio.run(scenario()) == (health_pb2.HealthCheckResponse.SERVING, 200)


def test_a_second_server_on_a_port_in_use_is_refused():
    """gRPC binds with SO_REUSEPORT by default: a second server on the port started without a word,
    and the kernel gave it a share of the first one's connections."""
    async def scenario():
        first = Server(port=0)
        await first.start()
        try:
            with pytest.raises(OSError, match=f"could not listen on 127.0.0.1:{first.port}"):
                Server(port=first.port)
        finally:
            await first.stop()

    asyncio.run(scenario())
