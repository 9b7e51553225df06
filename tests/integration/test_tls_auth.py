"""TLS, mutual TLS and token auth on real services (MemoryService, TrainerService), with certificates made here."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from memory3.services.memory.client import MemoryClient
from memory3.services.memory.server import SERVICE, MemorySettings, start_memory_server
from memory3.services.rpc.errors import ServiceError
from memory3.services.rpc.server import LIVENESS_SERVICE, ServerOptions, client_channel

pytestmark = pytest.mark.integration
TOKEN = "s3cr3t-token"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _with_server(random_release, local_s3, tmp_path, options: ServerOptions, body):
    settings = MemorySettings(release=random_release.name, s3=local_s3.config, cache_dir=tmp_path)
    app = await start_memory_server(settings, options)
    try:
        await app.wait_ready(60)
        await body(f"localhost:{app.port}")
    finally:
        await app.stop()


def test_tls_and_token(random_release, local_s3, tmp_path, pki):
    ids = [random_release.references[0].id]
    options = ServerOptions(port=0, tls_cert=pki["server"], tls_key=pki["server_key"], auth_token=TOKEN)

    async def body(address):
        async with client_channel(address, tls_ca=pki["ca"], auth_token=TOKEN) as channel:
            assert len(await MemoryClient(channel).get(ids)) == 1
        async with client_channel(address, tls_ca=pki["ca"], auth_token="wrong") as channel:
            denials = REGISTRY.get_sample_value("memory3_rpc_handled_total",
                                                {"method": "GetMemories", "code": "UNAUTHENTICATED"}) or 0.0
            with pytest.raises(ServiceError) as denied:
                await MemoryClient(channel).get(ids)
            assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert REGISTRY.get_sample_value("memory3_rpc_handled_total",
                                             {"method": "GetMemories", "code": "UNAUTHENTICATED"}) == denials + 1
            assert "authorization: Bearer" in str(denied.value)
            # Probes need no token.
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(address) as plain:  # TLS is not optional once enabled
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    run(_with_server(random_release, local_s3, tmp_path, options, body))


def test_mutual_tls_needs_a_client_certificate(random_release, local_s3, tmp_path, pki):
    ids = [random_release.references[0].id]
    options = ServerOptions(port=0, tls_cert=pki["server"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])

    async def body(address):
        async with client_channel(address, tls_ca=pki["ca"], client_cert=pki["client"],
                                  client_key=pki["client_key"]) as channel:
            assert len(await MemoryClient(channel).get(ids)) == 1
        async with client_channel(address, tls_ca=pki["ca"], auth_token="unused") as channel:
            with pytest.raises(ServiceError) as refused:
                await MemoryClient(channel).get(ids)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE

    run(_with_server(random_release, local_s3, tmp_path, options, body))


def test_plaintext_health_port_mirrors_the_tls_port_and_serves_nothing_else(random_release, local_s3, tmp_path,
                                                                           pki):
    """What the chart's kubelet probes use: TLS on the service port, health alone in plaintext beside it."""
    ids = [random_release.references[0].id]
    options = ServerOptions(port=0, tls_cert=pki["server"], tls_key=pki["server_key"], auth_token=TOKEN,
                            health_port=0)
    settings = MemorySettings(release=random_release.name, s3=local_s3.config, cache_dir=tmp_path)
    names = ["", SERVICE.full_name, LIVENESS_SERVICE]

    async def statuses(channel) -> list[int]:
        stub = health_pb2_grpc.HealthStub(channel)
        return [(await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status for name in names]

    async def scenario():
        app = await start_memory_server(settings, options)
        server = app.server
        assert server.health_port not in (None, 0, server.port)
        health_address = f"localhost:{server.health_port}"
        try:
            await app.wait_ready(60)
            async with client_channel(f"localhost:{app.port}", tls_ca=pki["ca"], auth_token=TOKEN) as tls, \
                    grpc.aio.insecure_channel(health_address) as plain:
                seen = []
                for change in (None, server.not_serving, server.serving):
                    if change is not None:
                        await change()
                    main, probe = await statuses(tls), await statuses(plain)
                    assert main == probe, change
                    seen.append(probe)
                # Only health is served there: the service, reflection and anything else are UNIMPLEMENTED.
                with pytest.raises(ServiceError) as absent:
                    await MemoryClient(plain).get(ids)
                assert absent.value.code == grpc.StatusCode.UNIMPLEMENTED
                reflection = plain.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
                with pytest.raises(grpc.aio.AioRpcError) as no_reflection:
                    await reflection(iter(()), timeout=5).read()
                assert no_reflection.value.code() == grpc.StatusCode.UNIMPLEMENTED
                # And the service port still refuses plaintext.
                async with grpc.aio.insecure_channel(f"localhost:{app.port}") as refused:
                    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
                        await health_pb2_grpc.HealthStub(refused).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await app.stop()
        async with grpc.aio.insecure_channel(health_address) as gone:  # stopped with the service
            with pytest.raises(grpc.aio.AioRpcError) as stopped:
                await health_pb2_grpc.HealthStub(gone).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE
        return seen

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert run(scenario()) == [[serving] * 3, [not_serving, not_serving, serving], [serving] * 3]


def test_bad_tls_options_are_refused_with_what_to_fix(pki):
    with pytest.raises(ValueError, match="both a certificate and a key"):
        ServerOptions(tls_cert=pki["server"])
    with pytest.raises(ValueError, match="needs TLS"):
        ServerOptions(tls_client_ca=pki["ca"])
    with pytest.raises(ValueError, match="only sent over TLS"):
        client_channel("localhost:1", auth_token=TOKEN)
    with pytest.raises(ValueError, match="must differ from the service port"):
        ServerOptions(port=50051, health_port=50051)


def test_the_trainer_service_takes_the_same_tls_and_token(local_s3, tmp_path, pki):
    """It can delete releases: `memory3 serve trainer --tls-cert ...` must not listen in plaintext."""
    from memory3.services.trainer.server import start_trainer_server
    from memory3.v1 import trainer_service_pb2 as pb
    from memory3.v1 import trainer_service_pb2_grpc as pb_grpc

    options = ServerOptions(port=0, tls_cert=pki["server"], tls_key=pki["server_key"], auth_token=TOKEN)

    async def body():
        server, engine = await start_trainer_server(local_s3.config, tmp_path / "runs", options)
        try:
            address = f"localhost:{server.port}"
            async with client_channel(address, tls_ca=pki["ca"], auth_token=TOKEN) as channel:
                await pb_grpc.TrainerServiceStub(channel).ListReleases(pb.ListReleasesRequest(), timeout=30)
            async with client_channel(address, tls_ca=pki["ca"], auth_token="wrong") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await pb_grpc.TrainerServiceStub(channel).DeleteRelease(
                        pb.DeleteReleaseRequest(name="anything"), timeout=30)
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with grpc.aio.insecure_channel(address) as plain:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await pb_grpc.TrainerServiceStub(plain).ListReleases(pb.ListReleasesRequest(), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop([engine.stop])

    run(body())
