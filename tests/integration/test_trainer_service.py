"""TrainerService over real gRPC: submit a quick job, watch it to the published release, errors."""

import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory3.services.trainer.server import start_trainer_server
from memory3.v1 import trainer_service_pb2 as pb
from memory3.v1 import trainer_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


async def scenario(s3, work_root):
    server, engine = await start_trainer_server(s3, work_root)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service="memory3.v1.TrainerService"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING

            stub = pb_grpc.TrainerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=pb.TrainingSpec(release="Bad Name")))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "invalid release name" in bad.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                async for _ in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id="nope")):
                    pass
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

            spec = pb.TrainingSpec(release="svc-quick", preset="tiny", quick=True)
            job = (await stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec))).job_id
            with pytest.raises(grpc.aio.AioRpcError) as dup:
                await stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec))
            assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS

            second = (await stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(
                spec=pb.TrainingSpec(release="svc-cancelled", preset="tiny", quick=True)))).job_id
            with pytest.raises(grpc.aio.AioRpcError) as busy:
                await stub.DeleteRelease(pb.DeleteReleaseRequest(name="svc-cancelled"))
            assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cancel it" in busy.value.details()
            cancelled = await stub.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id=second))
            assert cancelled.state == pb.JOB_STATE_CANCELLED

            events = [e async for e in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job))]
            assert events[-1].state == pb.JOB_STATE_SUCCEEDED, [e.message for e in events[-5:]]
            assert events[-1].release == "svc-quick"
            steps = [e for e in events if e.loss > 0]
            assert [e.step for e in steps] == list(range(1, 41)) and {e.total_steps for e in steps} == {40}
            assert any("heldout_acc_memory" in e.metrics for e in events)
            split = [e for e in steps if "attention_loss" in e.metrics]  # the default weight, 3
            assert split and all(e.loss == pytest.approx(e.metrics["lm_loss"] + 3 * e.metrics["attention_loss"],
                                                         abs=1e-3) for e in split)
            replay = [e async for e in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job))]
            assert len(replay) == len(events)  # a late watcher gets the whole history

            releases = await stub.ListReleases(pb.ListReleasesRequest())
            names = [r.name for r in releases.releases]
            assert "svc-quick" in names and "svc-cancelled" not in names

            dry = await stub.DeleteRelease(pb.DeleteReleaseRequest(name="svc-quick", dry_run=True))
            assert dry.objects_removed == 0 and "svc-quick" in dry.summary
            info = next(r for r in releases.releases if r.name == "svc-quick")
            listed = info.memories
            assert len(info.bank) == 20 and info.memory_bytes > 0 and info.codec == "bf16"
            assert dry.memories_removed + dry.memories_kept == listed
            assert "svc-quick" in [r.name for r in (await stub.ListReleases(pb.ListReleasesRequest())).releases]
            for name, code in (("svc-nope", grpc.StatusCode.NOT_FOUND), ("Bad Name", grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.DeleteRelease(pb.DeleteReleaseRequest(name=name))
                assert refused.value.code() == code
            deleted = await stub.DeleteRelease(pb.DeleteReleaseRequest(name="svc-quick"))
            assert deleted.objects_removed > 0 and deleted.memories_removed == dry.memories_removed
            assert "svc-quick" not in [r.name for r in (await stub.ListReleases(pb.ListReleasesRequest())).releases]
    finally:
        await server.stop([engine.stop])


def test_trainer_service_end_to_end(local_s3, tmp_path):
    # A bucket of its own: what it deletes and lists must not depend on other tests' releases.
    asyncio.run(scenario(dataclasses.replace(local_s3.config, bucket="trainer-service"), tmp_path / "runs"))
