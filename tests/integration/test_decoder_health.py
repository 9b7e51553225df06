"""A decoder's health follows its engine, over a real S3 server: a model whose passes keep failing
makes it not ready, and a device fault makes it not live, so that Kubernetes stops routing to it and
restarts it. Before, readiness and liveness stayed SERVING while every request failed (KServe#6259)."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.services.decoder import engine as engine_module
from memory3.services.decoder.engine import EngineConfig
from memory3.services.decoder.server import DecoderSettings, start_decoder_server
from memory3.services.rpc.server import LIVENESS_SERVICE, ServerOptions
from memory3.v1 import generation_service_pb2 as pb
from memory3.v1 import generation_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_health_follows_the_engine(tmp_path, random_release, local_s3, monkeypatch):
    monkeypatch.setattr(engine_module, "FAILING_FOR_S", 1.5)
    settings = DecoderSettings(release=random_release.name, s3=local_s3.config, cache_dir=tmp_path / "cache",
                               engine=EngineConfig(max_batch=2), watch_interval_s=0.1)

    async def main():
        app = await start_decoder_server(settings, ServerOptions(port=0))
        try:
            engine = await app.wait_ready(120)
            model = engine.scheduler.model
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                stub = pb_grpc.GenerationServiceStub(channel)

                async def status():
                    ready = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    live = await health.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5)
                    return ready.status == SERVING, live.status == SERVING

                async def complete():
                    try:
                        reply = await stub.Complete(pb.CompleteRequest(
                            prompt="Who repairs clocks?", params=pb.GenerationParams(max_tokens=4)), timeout=30)
                        return len(reply.token_ids)
                    except grpc.aio.AioRpcError as e:
                        return e.code()

                seen = {"healthy": (await complete(), await status())}

                def broken(*args, **kwargs):
                    raise RuntimeError("a bug in a model pass")

                with monkeypatch.context() as patched:
                    patched.setattr(model, "forward", broken)
                    failures = [await complete() for _ in range(engine_module.FAILING_STEPS)]
                    await asyncio.sleep(0.5)
                    seen["failing"] = (failures, await status())
                await asyncio.sleep(1.5)  # no failure for FAILING_FOR_S: taken as sound again
                seen["recovered"] = (await complete(), await status())

                def device_fault(*args, **kwargs):
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")

                with monkeypatch.context() as patched:
                    patched.setattr(model, "forward", device_fault)
                    fault = await complete()
                    await asyncio.sleep(0.5)
                seen["device fault"] = (fault, await status())
                await asyncio.sleep(2.0)  # for good: a device fault needs a new process
                seen["later"] = await status()
                return seen
        finally:
            await app.stop()

    seen = asyncio.run(main())
    assert seen["healthy"] == (4, (True, True))
    assert seen["failing"] == ([grpc.StatusCode.INTERNAL] * 3, (False, True))  # not ready, still live
    assert seen["recovered"] == (4, (True, True))
    assert seen["device fault"] == (grpc.StatusCode.INTERNAL, (False, False))
    assert seen["later"] == (False, False)


def test_under_the_continue_policy_a_decoder_started_in_an_outage_serves_without_memory(tmp_path, random_release,
                                                                                       local_s3):
    """It waited for its text and memory services under either policy: a pod started while they were down
    never turned ready, and its startup probe restarted it until they came back."""
    from memory3.services.storage.local_s3 import free_port

    nowhere = {"text_address": f"127.0.0.1:{free_port()}", "memory_address": f"127.0.0.1:{free_port()}"}
    settings = DecoderSettings(release=random_release.name, s3=local_s3.config, cache_dir=tmp_path / "cache",
                               engine=EngineConfig(max_batch=2, retrieval_policy="continue"), **nowhere)

    async def main():
        app = await start_decoder_server(settings, ServerOptions(port=0))
        try:
            await app.wait_ready(120)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                ready = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                reply = await pb_grpc.GenerationServiceStub(channel).Complete(pb.CompleteRequest(
                    prompt="Who repairs clocks?", params=pb.GenerationParams(max_tokens=4)), timeout=30)
                return ready.status, len(reply.token_ids)
        finally:
            await app.stop()

    assert asyncio.run(main()) == (SERVING, 4)
