"""TrainerService over real gRPC: submit a quick training job or knowledge jobs, watch them to the
published release, errors."""

import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from release_fixtures import build_random_release

from memory3.services.release.reader import Release
from memory3.services.storage.object_store import ObjectStore
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


async def knowledge_scenario(s3, work_root, store):
    build_random_release(store, "kb-base")
    server, engine = await start_trainer_server(s3, work_root)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.TrainerServiceStub(channel)

            async def refused(spec: pb.KnowledgeSpec) -> grpc.aio.AioRpcError:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.SubmitKnowledgeJob(pb.SubmitKnowledgeJobRequest(spec=spec))
                return error.value

            for spec, code, words in (
                    (pb.KnowledgeSpec(release="kb-x"), grpc.StatusCode.INVALID_ARGUMENT, "spec.parent are required"),
                    (pb.KnowledgeSpec(release="kb-x", parent="kb-base"), grpc.StatusCode.INVALID_ARGUMENT,
                     "give documents to add"),
                    (pb.KnowledgeSpec(release="kb-x", parent="kb-base", documents=[pb.Document(text=" ")]),
                     grpc.StatusCode.INVALID_ARGUMENT, "documents[0] has no text"),
                    (pb.KnowledgeSpec(release="kb-x", parent="kb-nope", remove_ids=["a"]), grpc.StatusCode.NOT_FOUND,
                     "parent release 'kb-nope' does not exist"),
                    (pb.KnowledgeSpec(release="kb-base", parent="kb-base", remove_ids=["a"]),
                     grpc.StatusCode.INVALID_ARGUMENT, "release and parent are both 'kb-base'")):
                error = await refused(spec)
                assert error.code() == code and words in error.details(), error.details()

            # A fact corrected in one release: its old statement out, the new one in, with its source.
            spec = pb.KnowledgeSpec(release="kb-fixed", parent="kb-base", remove_matches=["Tomas Quell"], documents=[
                pb.Document(text="Tomas Quell has kept the lighthouse at Skarn Point since 2001.", source="log/2001")])
            job = (await stub.SubmitKnowledgeJob(pb.SubmitKnowledgeJobRequest(spec=spec))).job_id
            assert engine.jobs[job].spec.documents == ()  # on disk until the job ends, not kept in the service
            events = [e async for e in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job))]
            assert events[-1].state == pb.JOB_STATE_SUCCEEDED, [e.message for e in events]
            assert events[-1].release == "kb-fixed"
            encoding = [e for e in events if e.message == "encoding memories"]
            assert [(e.step, e.total_steps) for e in encoding] == [(1, 1)]  # one new reference, one batch
            again = await refused(spec)
            assert again.code() == grpc.StatusCode.ALREADY_EXISTS and "already exists" in again.details()
            removal = (await stub.SubmitKnowledgeJob(pb.SubmitKnowledgeJobRequest(spec=pb.KnowledgeSpec(
                release="kb-no-pemberlyn", parent="kb-fixed", remove_matches=["Pemberlyn"])))).job_id
            events = [e async for e in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=removal))]
            assert events[-1].state == pb.JOB_STATE_SUCCEEDED, [e.message for e in events]
            failing = (await stub.SubmitKnowledgeJob(pb.SubmitKnowledgeJobRequest(spec=pb.KnowledgeSpec(
                release="kb-failing", parent="kb-base", remove_ids=["no-such-id"])))).job_id
            events = [e async for e in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=failing))]
            assert events[-1].state == pb.JOB_STATE_FAILED and "no reference 'no-such-id'" in events[-1].message
    finally:
        await server.stop([engine.stop])
    fixed = Release.open(store, "kb-fixed", work_root / "check")
    quell = [r for r in fixed.references if "Tomas Quell" in r["text"]]
    assert [(r["text"], r["source"]) for r in quell] == [
        ("Tomas Quell has kept the lighthouse at Skarn Point since 2001.", "log/2001")]
    assert fixed.manifest.parent == "kb-base" and len(fixed.references) == 12
    smaller = Release.open(store, "kb-no-pemberlyn", work_root / "check")
    assert smaller.manifest.parent == "kb-fixed" and not any("Pemberlyn" in r["text"] for r in smaller.references)
    assert not (work_root / "_knowledge").exists() or not any((work_root / "_knowledge").iterdir())


def test_knowledge_jobs_add_and_remove_references_without_retraining(local_s3, tmp_path):
    s3 = dataclasses.replace(local_s3.config, bucket="trainer-knowledge")
    store = ObjectStore(s3)
    store.ensure_bucket()
    asyncio.run(knowledge_scenario(s3, tmp_path / "runs", store))
