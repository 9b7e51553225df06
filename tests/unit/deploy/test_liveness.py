"""The health name the chart's liveness probes ask for: SERVING from start to shutdown, even while the
service itself is NOT_SERVING (a lost dependency must not get a pod restarted)."""

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.services.rpc.server import LIVENESS_SERVICE, Server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_liveness_stays_serving_while_readiness_flips():
    async def scenario():
        server = Server(port=0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)

                async def status(name):
                    return (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status

                seen = [(await status(""), await status(LIVENESS_SERVICE))]
                await server.serving()
                seen.append((await status(""), await status(LIVENESS_SERVICE)))
                await server.not_serving()
                seen.append((await status(""), await status(LIVENESS_SERVICE)))
                return seen
        finally:
            await server.stop()

    assert asyncio.run(scenario()) == [(NOT_SERVING, SERVING), (SERVING, SERVING), (NOT_SERVING, SERVING)]
    assert LIVENESS_SERVICE == "liveness"  # the name rendered in deploy/helm/memory3 (livenessProbe.grpc.service)


def test_health_port_shares_the_health_state_through_the_drain():
    """The plaintext health-only port (the chart's probes with TLS) answers from the same servicer."""
    async def scenario():
        server = Server(port=0, health_port=0, grace_s=5)
        await server.start()
        assert server.health_port not in (None, 0, server.port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as main, \
                grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
            async def both(name):
                request = health_pb2.HealthCheckRequest(service=name)
                return [(await health_pb2_grpc.HealthStub(c).Check(request, timeout=5)).status for c in (main, probe)]

            seen = [await both(""), await both(LIVENESS_SERVICE)]
            await server.serving()
            seen.append(await both(""))
            draining = asyncio.Event()

            async def hold():  # an on_drain hook: the state while in-flight work finishes
                seen.append(await both(""))
                draining.set()

            await server.stop(on_drain=[hold])
            assert draining.is_set()
        return seen

    assert asyncio.run(scenario()) == [[NOT_SERVING] * 2, [SERVING] * 2, [SERVING] * 2, [NOT_SERVING] * 2]
