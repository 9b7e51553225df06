"""TrainerService: translates protos to engine calls and back, nothing more."""

from __future__ import annotations

from memory3.model.config import default_preset
from memory3.v1 import trainer_service_pb2 as pb
from memory3.v1 import trainer_service_pb2_grpc as pb_grpc

from ..rpc.errors import InvalidInput, rpc_errors
from .engine import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    KnowledgeJobSpec,
    TrainingJobManager,
    TrainingJobSpec,
)

STATES = {QUEUED: pb.JOB_STATE_QUEUED, RUNNING: pb.JOB_STATE_RUNNING, SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
          FAILED: pb.JOB_STATE_FAILED, CANCELLED: pb.JOB_STATE_CANCELLED}
SERVICE = pb.DESCRIPTOR.services_by_name["TrainerService"]


def spec_from_proto(spec: pb.TrainingSpec) -> TrainingJobSpec:
    if not spec.release:
        raise InvalidInput("spec.release is required: the name of the release to publish")
    return TrainingJobSpec(release=spec.release, preset=spec.preset or default_preset(spec.quick), quick=spec.quick,
                           seed=spec.seed,
                           codec=spec.codec or "bf16", bf16=spec.bf16 if spec.HasField("bf16") else None,
                           stage3_steps=spec.stage3_steps if spec.HasField("stage3_steps") else None,
                           attention_weight=spec.attention_weight if spec.HasField("attention_weight") else None,
                           index_kind=spec.index_kind or "auto")


def knowledge_spec_from_proto(spec: pb.KnowledgeSpec) -> KnowledgeJobSpec:
    if not spec.release or not spec.parent:
        raise InvalidInput("spec.release and spec.parent are required: the release to publish and the one it "
                           "derives from")
    return KnowledgeJobSpec(release=spec.release, parent=spec.parent,
                            documents=tuple((d.source, d.text) for d in spec.documents),
                            remove_ids=tuple(spec.remove_ids), remove_matches=tuple(spec.remove_matches),
                            index_kind=spec.index_kind or None)


def event_to_proto(job_id: str, event: dict) -> pb.WatchTrainingJobResponse:
    metrics = {k: float(v) for k, v in (event.get("eval") or {}).items()}
    metrics.update({k: float(event[k]) for k in ("lm_loss", "attention_loss") if k in event})
    return pb.WatchTrainingJobResponse(
        job_id=job_id, state=STATES[event["state"]], step=int(event.get("step", 0)),
        total_steps=int(event.get("total_steps", 0)), stage=int(event.get("stage", 0)),
        loss=float(event.get("loss", 0.0)), metrics=metrics, message=str(event.get("message", "")),
        release=str(event.get("release") or ""),
    )


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, engine: TrainingJobManager) -> None:
        self.engine = engine

    @rpc_errors
    async def SubmitTrainingJob(self, request, context):  # noqa: N802 - gRPC method name
        job_id = await self.engine.submit(spec_from_proto(request.spec))
        return pb.SubmitTrainingJobResponse(job_id=job_id)

    @rpc_errors
    async def SubmitKnowledgeJob(self, request, context):  # noqa: N802
        job_id = await self.engine.submit(knowledge_spec_from_proto(request.spec))
        return pb.SubmitKnowledgeJobResponse(job_id=job_id)

    @rpc_errors
    async def WatchTrainingJob(self, request, context):  # noqa: N802
        async for event in self.engine.watch(request.job_id):
            yield event_to_proto(request.job_id, event)

    @rpc_errors
    async def CancelTrainingJob(self, request, context):  # noqa: N802
        return pb.CancelTrainingJobResponse(state=STATES[await self.engine.cancel(request.job_id)])

    @rpc_errors
    async def ListReleases(self, request, context):  # noqa: N802
        manifests = await self.engine.list_releases()
        return pb.ListReleasesResponse(releases=[
            pb.ReleaseInfo(name=m.name, parent=m.parent or "", created=m.created,
                           memories=int(m.memory_bank.get("count", 0)), codec=str(m.memory_bank.get("codec", "")),
                           bank=str(m.memory_bank.get("bank", "")), memory_bytes=int(m.memory_bank.get("bytes", 0)))
            for m in manifests])

    @rpc_errors
    async def DeleteRelease(self, request, context):  # noqa: N802
        plan, removed = await self.engine.delete_release(request.name, dry_run=request.dry_run)
        return pb.DeleteReleaseResponse(objects_removed=removed, memories_removed=plan.removed_memories,
                                        memories_kept=plan.kept, whole_bank=plan.whole_bank, summary=plan.summary())
