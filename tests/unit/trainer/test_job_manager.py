"""The TrainerService's job manager: its queue's logic, with a fake store (the point is the logic;
tests/integration/test_trainer_service.py runs it against a real S3 server)."""

import asyncio
import contextlib
import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest

from memory3.services.release.manifest import Manifest
from memory3.services.rpc.errors import AlreadyExists, ResourceExhausted, Unavailable
from memory3.services.storage.object_store import ObjectNotFound, S3Config, StoreUnavailable
from memory3.services.trainer import engine
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


# A child that ignores SIGTERM (stuck in a long C call, which sees the signal only when it returns).
STUBBORN = "trap '' TERM\necho '{\"message\": \"working\"}'\nexec sleep 600\n"


def child_script(tmp_path, name: str, script: str) -> str:
    """An executable shell script standing in for the job's python: what the tests make a child do."""
    child = tmp_path / name
    child.write_text(f"#!/bin/sh\n{script}")
    child.chmod(0o755)
    return str(child)


async def until_working(jobs: TrainingJobManager, job_id: str) -> None:
    """Until the job's child has said `working` (its stand-in script's first event)."""
    async for event in jobs.watch(job_id):
        if event.get("message") == "working":
            return



def one_job(jobs: TrainingJobManager, spec: TrainingJobSpec, timeout_s: float = 60) -> list[dict]:
    """Start the service, run one job to its end, stop the service: the job's events."""
    async def main():
        await jobs.start()
        try:
            job = await jobs.submit(spec)
            return [event async for event in jobs.watch(job)]
        finally:
            await jobs.stop(grace_s=0.5)

    return asyncio.run(asyncio.wait_for(main(), timeout_s))


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


class EmptyStore:
    """A bucket that answers and holds no release."""

    def ensure_bucket(self) -> None:
        pass

    def exists(self, key: str) -> bool:
        return False

    def get_bytes(self, key: str) -> bytes:
        raise ObjectNotFound(key)


def test_a_long_job_keeps_its_last_events_and_says_how_many_went(monkeypatch):
    """A training run emits an event a step: its whole history would grow without bound."""
    monkeypatch.setattr(engine, "MAX_JOB_EVENTS", 4)
    job = Job(id="long", spec=TrainingJobSpec(release="long"), state=engine.RUNNING)
    jobs = TrainingJobManager(S3Config(endpoint="127.0.0.1:9", access_key="k", secret_key="s"), Path("/nonexistent"))
    jobs.jobs[job.id] = job

    async def main():
        for step in range(1, 11):
            await job.publish({"step": step})
        watched = jobs.watch("long")
        first = [await anext(watched) for _ in range(5)]
        await job.publish({"step": 11})
        job.state = SUCCEEDED
        await job.publish({"message": "release published"})
        return first, [event async for event in watched]

    first, rest = asyncio.run(asyncio.wait_for(main(), 10))
    assert len(job.events) == 4 and job.dropped == 8 and job.published == 12
    assert first[0] == {"state": engine.RUNNING, "message": "6 earlier events are not kept"}
    assert [event["step"] for event in first[1:]] == [7, 8, 9, 10]
    assert rest == [{"state": engine.RUNNING, "step": 11}, {"state": SUCCEEDED, "message": "release published"}]


def test_jobs_outlive_a_restart_of_the_service(tmp_path):
    """A restarted service forgot every job: a watch of one that had run or was running got
    NOT_FOUND. Now its record answers, and one the service did not finish ends FAILED, saying so."""
    first = manager(tmp_path, EmptyStore())

    async def before():
        done = await first.submit(TrainingJobSpec(release="done", preset="tiny", quick=True))
        job = first.get(done)
        job.state = SUCCEEDED
        job.release = "done"
        await job.publish({"message": "release published", "release": "done"})
        return done, await first.submit(TrainingJobSpec(release="cut", preset="tiny", quick=True))

    done, cut = asyncio.run(before())  # the worker never ran: "cut" was queued when the service went
    (tmp_path / "_jobs" / "garbage.json").write_text("{not json")

    async def after():
        second = manager(tmp_path, EmptyStore())
        await second.start()
        try:
            return ([event async for event in second.watch(done)], [event async for event in second.watch(cut)],
                    second.get(done).release)
        finally:
            await second.stop()

    done_events, cut_events, release = asyncio.run(asyncio.wait_for(after(), 30))
    assert done_events[-1] == {"state": SUCCEEDED, "message": "release published", "release": "done"}
    assert release == "done"
    assert cut_events[0]["state"] == QUEUED
    assert cut_events[-1] == {"state": FAILED, "message": "the trainer service stopped while the job was queued: "
                              "submit it again (a training run resumes from its checkpoints)"}
    assert json.loads((tmp_path / "_jobs" / f"{cut}.json").read_text())["state"] == FAILED
    assert (tmp_path / "_jobs" / "garbage.bad").exists()  # set aside, not fatal


def test_only_the_last_finished_jobs_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "MAX_FINISHED_JOBS", 2)
    jobs = manager(tmp_path, EmptyStore())

    async def main():
        ids = []
        for i in range(4):
            ids.append(await jobs.submit(TrainingJobSpec(release=f"r{i}", preset="tiny", quick=True)))
            await jobs.cancel(ids[-1])
        return ids

    ids = asyncio.run(main())
    assert list(jobs.jobs) == ids[2:]
    assert sorted(p.stem for p in (tmp_path / "_jobs").glob("*.json")) == sorted(ids[2:])


def test_a_knowledge_job_record_reads_back_as_its_spec(tmp_path):
    spec = engine.KnowledgeJobSpec(release="a", parent="b", remove_ids=("x", "y"), remove_matches=("m",),
                                   index_kind="flat")
    job = Job(id="k", spec=spec, state=SUCCEEDED, release="a", record=tmp_path / "k.json")
    job.save()
    again = Job.load(tmp_path / "k.json")
    assert (again.spec, again.state, again.release) == (spec, SUCCEEDED, "a")


def test_sigterm_gives_the_jobs_children_the_grace_period_not_30_s():
    """The jobs' children were waited for up to 30 s whatever --grace said; the drain hooks and the
    server's own wait now share one grace period."""
    from memory3.services.rpc.server import ServerOptions
    from memory3.services.trainer.server import drain_hooks

    class Manager:
        async def stop(self, *, grace_s: float = 30.0) -> None:
            self.grace_s = grace_s

    manager = Manager()
    for hook in drain_hooks(manager, ServerOptions(grace_s=2.5)):
        asyncio.run(hook())
    assert manager.grace_s == 2.5


def test_a_cancelled_job_whose_child_ignores_sigterm_does_not_hold_the_queue(tmp_path):
    """Cancel sent the child a SIGTERM and nothing more: a child that did not end (stuck in a long
    C call, which sees the signal only when it returns) kept the worker waiting on it, and every
    job submitted after it stayed QUEUED. It is killed `kill_after_s` after the SIGTERM."""
    jobs = manager(tmp_path / "work", EmptyStore())
    jobs.python = child_script(tmp_path, "stubborn-python", STUBBORN)
    jobs.kill_after_s = 0.5

    async def main():
        await jobs.start()
        try:
            first = await jobs.submit(TrainingJobSpec(release="first", preset="tiny", quick=True))
            await until_working(jobs, first)
            assert await jobs.cancel(first) == CANCELLED
            second = await jobs.submit(TrainingJobSpec(release="second", preset="tiny", quick=True))
            await until_working(jobs, second)  # the worker is free again
            assert jobs.get(first).process.returncode is not None
            return jobs.get(second).state
        finally:
            await jobs.stop(grace_s=0.5)

    assert asyncio.run(asyncio.wait_for(main(), 60)) == engine.RUNNING


def test_stray_output_that_parses_as_json_is_not_an_event(tmp_path):
    """A line of the child's stdout such as `42` or `[1, 2]` (a library printing) parsed as JSON,
    and the job failed as an internal error of the service, its child killed."""
    jobs = manager(tmp_path / "work", EmptyStore())
    jobs.python = child_script(tmp_path, "chatty-python",
                               "echo 42\necho '[1, 2]'\necho '{\"step\": 1, \"total_steps\": 1}'\n")

    events = one_job(jobs, TrainingJobSpec(release="chatty", preset="tiny", quick=True))
    assert {"state": engine.RUNNING, "step": 1, "total_steps": 1} in events
    assert events[-1]["state"] == SUCCEEDED, events[-1]


def test_a_stop_cut_short_still_kills_the_jobs_children(tmp_path):
    """A second signal cancels the drain while it waits for the children: they were left running
    (a child still publishing after its service exited), as the kill came after the wait."""
    jobs = manager(tmp_path / "work", EmptyStore())
    jobs.python = child_script(tmp_path, "stubborn-python", STUBBORN)

    async def main():
        await jobs.start()
        job = await jobs.submit(TrainingJobSpec(release="first", preset="tiny", quick=True))
        await until_working(jobs, job)
        stopping = asyncio.ensure_future(jobs.stop(grace_s=600))
        await asyncio.sleep(0.3)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        process = jobs.get(job).process
        await asyncio.wait_for(process.wait(), 10)
        return process.returncode

    assert asyncio.run(asyncio.wait_for(main(), 60)) is not None


class StoreThatPublishes(EmptyStore):
    """A bucket in which release `name` appears once `publish()` is called (as the child would publish it)."""

    def __init__(self, name: str, created: str | None = None) -> None:
        self.name, self.created, self.manifest = name, created, None

    def publish(self) -> None:
        created = self.created or datetime.now(UTC).isoformat(timespec="seconds")
        self.manifest = Manifest(name=self.name, created=created, files={}, conventions={},
                                 memory_bank={"bank": "b", "count": 0, "bytes": 0, "codec": "bf16"},
                                 index={"embedder": "e", "dim": 1, "type": "flat", "count": 0}, provenance={})

    def get_bytes(self, key: str) -> bytes:
        if self.manifest is None or key != f"releases/{self.name}/manifest.json":
            raise ObjectNotFound(key)
        return self.manifest.to_json().encode()


@pytest.mark.parametrize(("published", "created", "state"), [
    (True, None, SUCCEEDED),  # the cancel came after the publication: the release stays, and so does the job's
    (False, None, CANCELLED),
    (True, "2020-01-01T00:00:00+00:00", CANCELLED),  # published before the job began: not the job's
])
def test_a_cancel_that_comes_after_the_publication_leaves_the_job_succeeded(tmp_path, published, created, state):
    """The child had published its release when the SIGTERM reached it (releasing its lease, writing its
    summary): the job said CANCELLED while its release was published, and resubmitting it failed."""
    store = StoreThatPublishes("late", created)
    jobs = manager(tmp_path / "work", store)
    jobs.python = child_script(tmp_path, "publishing-python", "echo '{\"message\": \"working\"}'\nexec sleep 600\n")

    async def main():
        await jobs.start()
        try:
            job = await jobs.submit(TrainingJobSpec(release="late", preset="tiny", quick=True))
            await until_working(jobs, job)
            watched = asyncio.ensure_future(_events(jobs.watch(job)))  # a watcher from before the cancel
            if published:
                store.publish()
            assert await jobs.cancel(job) == CANCELLED
            return jobs.get(job), await asyncio.wait_for(watched, 20)
        finally:
            await jobs.stop(grace_s=0.5)

    job, events = asyncio.run(asyncio.wait_for(main(), 60))
    assert job.state == state and events[-1]["state"] == state  # the watcher saw how it ended
    if state == SUCCEEDED:
        assert job.release == "late" and "was published before the cancel" in job.events[-1]["message"]


async def _events(watch) -> list[dict]:
    return [event async for event in watch]


def test_a_cancel_ends_what_the_jobs_child_started_too(tmp_path):
    """Only the child got the SIGTERM and the SIGKILL: a process it had started (a compile worker, a
    shell's command) that ignores SIGTERM ran on after the job was cancelled, holding the child's
    output open, so that the job never ended and every job queued after it waited."""
    pid_file = tmp_path / "grandchild.pid"
    jobs = manager(tmp_path / "work", EmptyStore())
    jobs.python = child_script(tmp_path, "python-with-a-worker",
                               f"sh -c \"trap '' TERM; echo \\$\\$ >> {pid_file}; exec sleep 600\" &\n"
                               "echo '{\"message\": \"working\"}'\nwait\n")
    jobs.kill_after_s = 0.5

    async def main():
        await jobs.start()
        try:
            job = await jobs.submit(TrainingJobSpec(release="first", preset="tiny", quick=True))
            await until_working(jobs, job)
            while not pid_file.exists() or not pid_file.read_text().strip():
                await asyncio.sleep(0.01)
            grandchild = int(pid_file.read_text())
            assert await jobs.cancel(job) == CANCELLED
            second = await jobs.submit(TrainingJobSpec(release="second", preset="tiny", quick=True))
            await until_working(jobs, second)  # the worker is free again
            return _alive(grandchild)
        finally:
            await jobs.stop(grace_s=0.5)

    try:
        assert asyncio.run(asyncio.wait_for(main(), 20)) is False
    finally:
        for pid in pid_file.read_text().split():  # the first job's, and the second's
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ParentsStore(EmptyStore):
    """A bucket holding the parents `p1`..`p3` and no other release."""

    def exists(self, key: str) -> bool:
        return key.split("/")[1] in ("p1", "p2", "p3")


def test_a_stderr_line_longer_than_the_reader_takes_does_not_hang_the_job(tmp_path, monkeypatch):
    """A progress bar's carriage returns are one line to a line reader: past its limit the reader ended,
    nobody read the pipe, and the child blocked once it was full, with every job queued behind it."""
    monkeypatch.setattr(engine, "MAX_OUTPUT_LINE", 4096)
    jobs = manager(tmp_path / "work", EmptyStore())
    jobs.python = child_script(tmp_path, "progress-python",
                               "head -c 300000 /dev/zero | tr '\\0' '\\r' >&2\n"
                               "echo 'error: the bar ran to its end' >&2\nexit 3\n")

    events = one_job(jobs, TrainingJobSpec(release="barred", preset="tiny", quick=True))
    assert events[-1] == {"state": FAILED, "message": "error: the bar ran to its end"}


def test_a_child_left_running_by_a_stopped_service_is_stopped_when_it_starts_again(tmp_path):
    """Its child ran in a session of its own and outlived the service (killed): resubmitted, the job trained
    in the same work directory beside it, each removing the other's checkpoints, and the orphan could publish."""
    import subprocess
    import sys
    import textwrap

    python = child_script(tmp_path, "memory3-python", "echo '{\"message\": \"working\"}'\nsleep 600\n")
    service = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from memory3.services.storage.object_store import S3Config
        from memory3.services.trainer.engine import TrainingJobManager, TrainingJobSpec

        class EmptyStore:
            def ensure_bucket(self): pass
            def exists(self, key): return False

        async def main():
            jobs = TrainingJobManager(S3Config(endpoint="127.0.0.1:9", access_key="k", secret_key="s"),
                                      Path({str(tmp_path / "work")!r}), python={python!r})
            jobs.store = EmptyStore()
            await jobs.start()
            job_id = await jobs.submit(TrainingJobSpec(release="orphaned", preset="tiny", quick=True))
            async for event in jobs.watch(job_id):
                if event.get("message") == "working":
                    print(jobs.get(job_id).pid, flush=True)
                    await asyncio.sleep(600)

        asyncio.run(main())
    """)
    first = subprocess.Popen([sys.executable, "-c", service], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(first.stdout.readline())
    finally:
        first.kill()  # the service is killed; its job's child runs on
        first.wait()
    try:
        os.kill(pid, 0)

        async def after():
            second = manager(tmp_path / "work", EmptyStore())
            await second.start()
            await second.stop()

        asyncio.run(asyncio.wait_for(after(), 30))
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            asyncio.run(asyncio.sleep(0.05))
        else:
            pytest.fail(f"the child {pid} of the stopped service still runs")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_a_published_job_leaves_no_checkpoints_and_knowledge_jobs_keep_two_parents(tmp_path):
    """Checkpoints of published runs and every parent a knowledge job downloaded stayed on the service's
    volume for ever."""
    from memory3.services.trainer.engine import RELEASE_COPIES, KnowledgeJobSpec

    jobs = manager(tmp_path / "work", ParentsStore())
    jobs.python = child_script(tmp_path, "done-python",  # a knowledge job's child downloads its parent
                               'while [ $# -gt 0 ]; do case "$1" in --release) parent="$2";; --cache-dir) cache="$2";; '
                               'esac; shift; done\n[ -n "$cache" ] && mkdir -p "$cache/$parent"\nexit 0\n')
    spec = TrainingJobSpec(release="trained", preset="tiny", quick=True)
    run = jobs._run_dir(spec)
    for part in ("checkpoints/step-0000010", "model"):
        (run / part).mkdir(parents=True)
    (run / "history.json").write_text("[]")
    copies = tmp_path / "work" / RELEASE_COPIES
    for name in ("p1", "p2", "p3", "k1"):
        (copies / name).mkdir(parents=True)

    async def main():
        await jobs.start()
        try:
            kept = []
            for release, parent in (("trained", None), ("k1", "p1"), ("k2", "p2"), ("k3", "p1"), ("k4", "p3")):
                job_id = await jobs.submit(spec if parent is None else
                                           KnowledgeJobSpec(release=release, parent=parent, documents=(("", "x"),)))
                assert [e async for e in jobs.watch(job_id)][-1]["state"] == SUCCEEDED
                kept.append(sorted(p.name for p in copies.iterdir()))
            return kept
        finally:
            await jobs.stop(grace_s=0.5)

    kept = asyncio.run(asyncio.wait_for(main(), 60))
    assert sorted(p.name for p in run.iterdir()) == ["history.json"]  # its curve and history stay
    assert kept == [["k1", "p1", "p2", "p3"], ["p1"], ["p1", "p2"], ["p1", "p2"], ["p1", "p3"]]


def test_deleting_a_release_removes_the_services_copy_of_it(tmp_path, monkeypatch):
    """`memory3 release delete` removed its local copies; the service's DeleteRelease left its own."""
    from memory3.services.trainer.engine import RELEASE_COPIES

    monkeypatch.setattr(engine, "Maintenance", lambda *_args: contextlib.nullcontext("lease"))
    monkeypatch.setattr(engine, "plan_deletion", lambda _store, name: f"plan of {name}")
    monkeypatch.setattr(engine, "delete_release", lambda _store, plan, lease, log: 7)
    jobs = manager(tmp_path, EmptyStore())
    for name in ("gone", "kept"):
        (tmp_path / RELEASE_COPIES / name / "model").mkdir(parents=True)
    assert asyncio.run(jobs.delete_release("gone", dry_run=True)) == ("plan of gone", 0)
    assert (tmp_path / RELEASE_COPIES / "gone").exists()
    assert asyncio.run(jobs.delete_release("gone", dry_run=False)) == ("plan of gone", 7)
    assert sorted(p.name for p in (tmp_path / RELEASE_COPIES).iterdir()) == ["kept"]
