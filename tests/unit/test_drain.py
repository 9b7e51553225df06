"""Shutdown: the drain hooks and the gRPC server's own wait share one grace period."""

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.services.rpc.server import LIVENESS_SERVICE, Server


def test_the_drain_hooks_and_the_servers_wait_share_one_grace_period():
    """The decoder's drain hook waited up to the grace period, then the server waited as long again
    for RPCs still going: they were cut at twice --grace, after the pod's termination grace period
    (sized from one) had killed the process without a status."""
    grace, hook_s = 2.0, 1.8

    async def scenario():
        server = Server(port=0, grace_s=grace)
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE))
            await watch.read()  # an RPC in flight until the server cancels it

            async def slow_drain():
                await asyncio.sleep(hook_s)

            start = time.monotonic()
            await server.stop(on_drain=[slow_drain])
            took = time.monotonic() - start
            try:
                while await watch.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as e:
                return took, e.code()
            return took, grpc.StatusCode.OK

    took, code = asyncio.run(scenario())
    assert grace <= took < grace + 1.0, took  # once: hook_s + grace before
    assert code == grpc.StatusCode.UNAVAILABLE  # the RPC still going was cancelled with a status
