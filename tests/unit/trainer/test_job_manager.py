"""The TrainerService's job manager: its queue's logic, with a fake store (the point is the logic;
tests/integration/test_trainer_service.py runs it against a real S3 server)."""

import asyncio

import pytest

from memory3.services.rpc.errors import AlreadyExists, ResourceExhausted, Unavailable
from memory3.services.storage.object_store import S3Config, StoreUnavailable
from memory3.services.trainer.engine import (
    CANCELLED,
    FAILED,
    QUEUED,
    SUCCEEDED,
    Job,
    TrainingJobManager,
    TrainingJobSpec,
)


class SlowEmptyStore:
    """A bucket with no release, answering after a moment, as a remote store does."""

    delay_s = 0.05

    def exists(self, key: str) -> bool:
        import time

        time.sleep(self.delay_s)
        return False


class DownStore:
    def exists(self, key: str) -> bool:
        raise StoreUnavailable("cannot reach the object store at 127.0.0.1:9")


def manager(tmp_path, store=None, **kwargs) -> TrainingJobManager:
    jobs = TrainingJobManager(S3Config(endpoint="127.0.0.1:9", access_key="k", secret_key="s"), tmp_path,
                              python="python", **kwargs)
    if store is not None:
        jobs.store = store
    return jobs


def test_submissions_of_one_release_that_cross_are_one_job(tmp_path):
    """All passed the checks while the store answered, and all but one failed later, as jobs."""
    jobs = manager(tmp_path, SlowEmptyStore())

    async def main():
        spec = TrainingJobSpec(release="r1", preset="tiny", quick=True)
        return await asyncio.gather(*(jobs.submit(spec) for _ in range(4)), return_exceptions=True)

    results = asyncio.run(main())
    assert sum(isinstance(r, str) for r in results) == 1
    assert all(isinstance(r, AlreadyExists) for r in results if not isinstance(r, str))
    assert len(jobs.jobs) == 1


def test_cancelled_jobs_leave_the_queue_room(tmp_path):
    jobs = manager(tmp_path, DownStore(), max_queued=2)
    for i, state in enumerate((CANCELLED, CANCELLED)):
        job = Job(id=f"old{i}", spec=TrainingJobSpec(release=f"old{i}"), state=state)
        jobs.jobs[job.id] = job
        jobs.queue.put_nowait(job)  # still in the queue, skipped when their turn comes
    spec = TrainingJobSpec(release="r1")
    with pytest.raises(Unavailable, match="object store cannot be reached"):  # past the queue check
        asyncio.run(jobs.submit(spec))
    for job in jobs.jobs.values():
        job.state = QUEUED
    with pytest.raises(ResourceExhausted, match="2 jobs are already queued"):
        asyncio.run(jobs.submit(spec))


def test_a_job_the_service_fails_to_run_fails_alone(tmp_path, monkeypatch):
    """An exception in the worker left its job running and every job after it queued, forever."""
    jobs = manager(tmp_path)

    async def run(job):
        if job.id == "broken":
            raise OSError("embedded null byte")
        job.state = SUCCEEDED
        await job.publish({"message": "release published"})

    monkeypatch.setattr(jobs, "_run", run)

    async def main():
        jobs.worker = asyncio.create_task(jobs._work())
        try:
            for name in ("broken", "after"):
                job = Job(id=name, spec=TrainingJobSpec(release=name))
                jobs.jobs[name] = job
                await jobs.queue.put(job)
            return [event async for event in jobs.watch("broken")], [event async for event in jobs.watch("after")]
        finally:
            jobs.worker.cancel()

    broken, after = asyncio.run(asyncio.wait_for(main(), 30))
    assert broken[-1] == {"state": FAILED, "message": "internal error in the trainer service while running the job"}
    assert after[-1]["state"] == SUCCEEDED
