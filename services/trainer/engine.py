"""Training and knowledge jobs behind the TrainerService: protocol-neutral, asyncio.

A training job runs `memory3 train --events` in a child process (the same code as the CLI), one
job at a time; its JSON-lines progress becomes the job's event history, which any number of
watchers replay and then follow. Cancelling terminates the child; its checkpoints stay, so
submitting the same spec again resumes. A cancel that comes after the child published its release
leaves the job SUCCEEDED: the release cannot be taken back by a cancel. A knowledge job runs
`memory3 kb add` (or `kb remove`) the same way, on documents the request carried, written to the
job's directory as JSON Lines.

Jobs outlive the service that ran them: each job's record (spec, state, release, its last events)
is kept under `WORK_DIR/_jobs/` whenever its state changes, so a restarted service still answers a
watch of it; a job it was running or had queued when it died ends FAILED there, saying to submit
it again (a stop cancels them). A cancelled job's child that has not ended `kill_after_s` after its
SIGTERM is killed: the worker waits for it, so every job queued behind it would wait too. A
training run emits an event a step, so a job keeps its last `MAX_JOB_EVENTS`, and the service
its last `MAX_FINISHED_JOBS` finished jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

from memory3.model.config import PRESETS

from ..release.catalog import DeletionPlan, Maintenance, ReleaseBusy, delete_release, plan_deletion, read_catalog
from ..release.manifest import Manifest, ReleaseError, ReleaseNotFound, check_release_name, release_key
from ..release.reader import read_manifest
from ..retrieval.index import check_index_choice
from ..rpc.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound, ResourceExhausted, Unavailable
from ..storage.object_store import ObjectStore, S3Config, StoreUnavailable, s3_arguments

log = logging.getLogger("memory3.trainer")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
CODECS = ("fp16", "bf16", "int8", "vq")
# Steps of one stage: years of training on any machine, and well inside the uint32 progress fields.
MAX_STAGE_STEPS = 100_000_000
MAX_OUTPUT_LINE = 16 << 20  # a child's output line (an error quoting a long id); asyncio's default is 64 KiB
MAX_MESSAGE_CHARS = 2000  # of one such line kept for a job's failure message
MAX_JOB_EVENTS = 10_000  # a job's events kept for watchers (a training run emits one a step)
RECORD_EVENTS = 200  # of them kept in its record on disk
MAX_FINISHED_JOBS = 500  # finished jobs kept, with their records; older ones are forgotten
RELEASE_COPIES = "_releases"  # under the work root: local copies of the releases knowledge jobs read


@dataclass(frozen=True)
class TrainingJobSpec:
    release: str
    preset: str = "small"
    quick: bool = False
    seed: int = 0
    codec: str = "bf16"
    bf16: bool | None = None  # None: on where the device computes bf16 natively
    stage3_steps: int | None = None  # None: the preset's default
    attention_weight: float | None = None  # None: the preset's default
    index_kind: str = "auto"

    def validate(self) -> None:
        try:
            check_release_name(self.release)
        except ReleaseError as e:
            raise InvalidInput(str(e)) from e
        if self.preset not in PRESETS:
            raise InvalidInput(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.codec not in CODECS:
            raise InvalidInput(f"unknown codec {self.codec!r}; choose one of {list(CODECS)}")
        if self.stage3_steps is not None and not 0 <= self.stage3_steps <= MAX_STAGE_STEPS:
            raise InvalidInput(f"stage3_steps is {self.stage3_steps}; give a number of steps from 0 to "
                               f"{MAX_STAGE_STEPS}")
        if self.attention_weight is not None and not (math.isfinite(self.attention_weight)
                                                      and self.attention_weight >= 0):
            raise InvalidInput(f"attention_weight is {self.attention_weight}; give a finite number >= 0")
        _check_index_kind(self.index_kind)


def _check_index_kind(choice: str) -> None:
    try:
        check_index_choice(choice)
    except ValueError as e:
        raise InvalidInput(f"index_kind: {e}") from e


MAX_KNOWLEDGE_BYTES = 64 << 20  # documents of one knowledge job


@dataclass(frozen=True)
class KnowledgeJobSpec:
    release: str
    parent: str
    documents: tuple[tuple[str, str], ...] = ()  # (source, text)
    remove_ids: tuple[str, ...] = ()
    remove_matches: tuple[str, ...] = ()
    index_kind: str | None = None  # None: the parent's

    def validate(self) -> None:
        for what, name in (("release", self.release), ("parent", self.parent)):
            try:
                check_release_name(name)
            except ReleaseError as e:
                raise InvalidInput(f"{what}: {e}") from e
        if self.release == self.parent:
            raise InvalidInput(f"release and parent are both {self.release!r}: releases are immutable, name a new one")
        if not (self.documents or self.remove_ids or self.remove_matches):
            raise InvalidInput("give documents to add, or references to remove (remove_ids, remove_matches)")
        empty = [i for i, (_, text) in enumerate(self.documents) if not text.strip()]
        if empty:
            raise InvalidInput(f"documents[{empty[0]}] has no text")
        if self.index_kind is not None:
            _check_index_kind(self.index_kind)
            if not self.documents:
                raise InvalidInput("index_kind is for a job that adds documents; one that only removes references "
                                   "keeps the parent's index kind")
        if any(not m for m in self.remove_matches):
            raise InvalidInput("remove_matches holds an empty text, which would match every reference")
        size = sum(len(text.encode()) + len(source.encode()) for source, text in self.documents)
        if size > MAX_KNOWLEDGE_BYTES:
            raise InvalidInput(f"the documents hold {size} bytes, over the {MAX_KNOWLEDGE_BYTES}-byte limit of one "
                               "job; submit them in several jobs and merge the releases (`memory3 kb merge`)")


@dataclass
class Job:
    id: str
    spec: TrainingJobSpec | KnowledgeJobSpec
    state: str = QUEUED
    events: deque[dict] = field(default_factory=lambda: deque(maxlen=MAX_JOB_EVENTS))
    dropped: int = 0  # events published before those kept
    release: str | None = None
    process: asyncio.subprocess.Process | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    documents: Path | None = None  # a knowledge job's documents, on disk from submission to the job's end
    removals: Path | None = None  # and the references it removes (JSON Lines: `kb ... --from`)
    record: Path | None = None  # where its record is kept
    saved_state: str | None = None  # the state its record holds
    # Cancelled while its child ran, which has not ended yet: the state may still turn SUCCEEDED (a
    # release published before the cancel reached the child), so watchers stay until it ended.
    settling: bool = False
    pid: int | None = None  # its child's, which leads the child's process group, while it runs

    @property
    def over(self) -> bool:
        """In its final state: watchers have nothing more to wait for."""
        return self.state in TERMINAL and not self.settling

    async def settle(self) -> None:
        """The child of a cancelled job ended: its state is final now."""
        async with self.changed:
            self.settling = False
            self.changed.notify_all()

    @property
    def published(self) -> int:
        """Events published so far, kept or not."""
        return self.dropped + len(self.events)

    async def publish(self, event: dict) -> None:
        async with self.changed:
            if len(self.events) == self.events.maxlen:
                self.dropped += 1
            self.events.append({"state": self.state, **event})
            self.changed.notify_all()
        if self.record is not None and self.state != self.saved_state:
            try:
                self.save()
            except OSError as e:  # a full disk must not stop the job; its record is only for later
                log.warning("job %s: its record %s could not be written (%s)", self.id, self.record, e)

    def save(self) -> None:
        """Written whole to a temporary file, then renamed: a record is never half-written."""
        kind = "knowledge" if isinstance(self.spec, KnowledgeJobSpec) else "training"
        data = {"id": self.id, "kind": kind, "spec": dataclasses.asdict(self.spec), "state": self.state,
                "release": self.release, "pid": self.pid,
                "dropped": self.published - min(len(self.events), RECORD_EVENTS),
                "events": list(islice(self.events, max(0, len(self.events) - RECORD_EVENTS), None))}
        self.record.parent.mkdir(parents=True, exist_ok=True)
        part = self.record.with_suffix(".part")
        part.write_text(json.dumps(data), encoding="utf-8")
        part.replace(self.record)
        self.saved_state = self.state

    @classmethod
    def load(cls, record: Path) -> Job:
        data = json.loads(record.read_text(encoding="utf-8"))
        spec = dict(data["spec"])
        if data["kind"] == "knowledge":
            for key in ("documents", "remove_ids", "remove_matches"):
                spec[key] = tuple(tuple(v) if isinstance(v, list) else v for v in spec.get(key, ()))
            spec = KnowledgeJobSpec(**spec)
        else:
            spec = TrainingJobSpec(**spec)
        job = cls(id=str(data["id"]), spec=spec, state=str(data["state"]), release=data.get("release"),
                  dropped=int(data.get("dropped", 0)), record=record, saved_state=str(data["state"]),
                  pid=data.get("pid") if isinstance(data.get("pid"), int) else None)
        job.events.extend(data.get("events", []))
        return job


class TrainingJobManager:
    def __init__(self, s3: S3Config, work_root: Path, *, max_queued: int = 16, python: str = sys.executable,
                 kill_after_s: float = 30.0, device: str | None = None) -> None:
        self.s3, self.work_root, self.max_queued, self.python = s3, work_root, max_queued, python
        self.device = device  # where jobs train and encode memories; None: their own default (auto)
        self.kill_after_s = kill_after_s
        self._killers: set[asyncio.Task] = set()
        self.store = ObjectStore(s3)
        self.jobs: dict[str, Job] = {}  # in submission order
        self.records = work_root / "_jobs"
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self._submitting: set[str] = set()  # releases whose submission is being checked
        self.worker: asyncio.Task | None = None
        self._recent_parents: deque[str] = deque(maxlen=2)  # of knowledge jobs, most recent last (`_free_disk`)

    async def start(self, *, retry_s: float = 1.0, max_retry_s: float = 30.0) -> None:
        """Readiness: the store answers. One that does not yet (starting beside this service) is
        asked again, with backoff, as the memory service does; the service is not SERVING until then."""
        delay = retry_s
        while True:
            try:
                await asyncio.to_thread(self.store.ensure_bucket)
                break
            except StoreUnavailable as e:
                log.warning("the object store does not answer (%s); trying again in %.0f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, max_retry_s)
        await asyncio.to_thread(self._load_records)
        self.worker = asyncio.create_task(self._work())

    def _load_records(self) -> None:
        """The jobs of earlier runs of the service, oldest first; those it did not finish end FAILED."""
        loaded = []
        for record in self.records.glob("*.json") if self.records.is_dir() else ():
            try:
                loaded.append((record.stat().st_mtime, Job.load(record)))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("job record %s cannot be read (%s); it is set aside as %s", record, e,
                            record.with_suffix(".bad").name)
                with contextlib.suppress(OSError):
                    record.replace(record.with_suffix(".bad"))
        for _, job in sorted(loaded, key=lambda pair: pair[0]):
            if job.state not in TERMINAL:
                was = job.state
                _stop_orphan(job.pid)
                job.state, job.pid = FAILED, None
                job.events.append({"state": FAILED, "message": f"the trainer service stopped while the job was {was}: "
                                   "submit it again (a training run resumes from its checkpoints)"})
                with contextlib.suppress(OSError):  # it says so in memory; on disk when it can
                    job.save()
                self._remove_job_files(job)
            self.jobs[job.id] = job
        if loaded:
            log.info("%d jobs of earlier runs of the service", len(loaded))
        self._forget_old_jobs()

    def _forget_old_jobs(self) -> None:
        finished = [job for job in self.jobs.values() if job.over]
        for job in finished[:max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self.jobs[job.id]
            if job.record is not None:
                job.record.unlink(missing_ok=True)

    async def stop(self, *, grace_s: float = 30.0) -> None:
        """Cancel every job (a training run takes hours: it resumes from its checkpoints when submitted
        again), and wait up to `grace_s` for their children to clean up what they had begun to publish."""
        running = [job for job in self.jobs.values() if job.state in (QUEUED, RUNNING)]
        for job in running:
            await self.cancel(job.id, reason="cancelled: the trainer service is stopping")
        children = [job.process for job in running if job.process is not None and job.process.returncode is None]
        try:
            if children:
                await asyncio.wait([asyncio.ensure_future(p.wait()) for p in children], timeout=grace_s)
        finally:  # also when the wait is cut short (a second signal): no child outlives the service
            for process in children:  # an ended child's group may hold a process that ignored the SIGTERM
                _signal_group(process, signal.SIGKILL)
        for task in (*self._killers, self.worker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _queued(self) -> int:
        return sum(job.state == QUEUED for job in self.jobs.values())  # cancelled ones wait in the queue too

    async def submit(self, spec: TrainingJobSpec | KnowledgeJobSpec) -> str:
        spec.validate()
        # Checked and reserved before the first await: submissions of one release that cross would
        # otherwise all pass the checks, and all but one fail later, as jobs.
        if spec.release in self._submitting or any(j.spec.release == spec.release and j.state not in TERMINAL
                                                   for j in self.jobs.values()):
            raise AlreadyExists(f"a job for release {spec.release!r} is already queued or running")
        if self._queued() + len(self._submitting) >= self.max_queued:
            raise ResourceExhausted(f"{self.max_queued} jobs are already queued; try again later")
        self._submitting.add(spec.release)
        try:
            return await self._submit(spec)
        except StoreUnavailable as e:
            raise Unavailable(f"the object store cannot be reached ({e}); retry later") from e
        finally:
            self._submitting.discard(spec.release)

    async def _submit(self, spec: TrainingJobSpec | KnowledgeJobSpec) -> str:
        if await asyncio.to_thread(self.store.exists, release_key(spec.release, "manifest.json")):
            raise AlreadyExists(f"release {spec.release!r} already exists; releases are immutable")
        if isinstance(spec, KnowledgeJobSpec) and not await asyncio.to_thread(
                self.store.exists, release_key(spec.parent, "manifest.json")):
            raise NotFound(f"parent release {spec.parent!r} does not exist (no manifest in bucket {self.s3.bucket})")
        job = Job(id=uuid.uuid4().hex[:12], spec=spec)
        job.record = self.records / f"{job.id}.json"
        if isinstance(spec, KnowledgeJobSpec):
            # On disk, not in the job list that the service keeps: up to MAX_KNOWLEDGE_BYTES a job;
            # removals too, which may be more than a command line holds.
            job.documents, job.removals = await asyncio.to_thread(self._write_job_files, job.id, spec)
            job.spec = dataclasses.replace(spec, documents=())
        self.jobs[job.id] = job
        await job.publish({"message": f"queued (position {self._queued()})"})
        await self.queue.put(job)
        return job.id

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise NotFound(f"no job {job_id!r}")
        return self.jobs[job_id]

    async def watch(self, job_id: str) -> AsyncIterator[dict]:
        """The job's events kept, then each new one, until it ends; a note first where earlier ones
        were not kept."""
        job = self.get(job_id)
        sent = 0  # of the events published
        while True:
            async with job.changed:
                await job.changed.wait_for(lambda n=sent: job.published > n or job.over)
                new = []
                if sent < job.dropped:
                    state = job.events[0]["state"] if job.events else job.state
                    new.append({"state": state, "message": f"{job.dropped - sent} earlier events are not kept"})
                    sent = job.dropped
                new += islice(job.events, sent - job.dropped, None)
                sent = job.published
                done = job.over
            for event in new:
                yield event
            if done and sent == job.published:
                return

    async def cancel(self, job_id: str, *, reason: str = "cancelled") -> str:
        job = self.get(job_id)
        if job.state in TERMINAL:
            return job.state
        if job.process is not None and job.process.returncode is None:
            job.settling = True
            self._terminate(job.process)
        elif job.state == QUEUED:  # it will not run
            self._remove_job_files(job)
        job.state = CANCELLED
        await job.publish({"message": reason})
        self._forget_old_jobs()
        return job.state

    async def _published_since(self, name: str, started: datetime) -> bool:
        """Whether release `name` was published at or after `started`: by the job, then, since its child
        refuses a name already published. A cancel reaching the child after its publication (as it released
        its lease, or wrote its summary) left the release published while the job said CANCELLED, and a
        resubmission failed with ALREADY_EXISTS."""
        try:
            manifest = await asyncio.to_thread(read_manifest, self.store, name)
        except ReleaseNotFound:
            return False
        except (ReleaseError, StoreUnavailable) as e:
            log.warning("cancelled job for release %r: whether it was published cannot be told (%s)", name, e)
            return False
        return datetime.fromisoformat(manifest.created) >= started

    def _terminate(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM (the child unwinds what it had begun to publish), then SIGKILL if it has not ended
        within `kill_after_s`: a child in a long C call (an index build, a kernel) sees the SIGTERM
        only when that call returns. Both go to the child's process group, so that processes it
        started (compile workers, a shell's commands) end with it."""
        _signal_group(process, signal.SIGTERM)

        async def kill_if_still_running() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), self.kill_after_s)
            if process.returncode is None:
                log.warning("a cancelled job's child (pid %d) did not end %.0f s after SIGTERM; killing it",
                            process.pid, self.kill_after_s)
            _signal_group(process, signal.SIGKILL)  # also what it started and left behind

        task = asyncio.create_task(kill_if_still_running())
        self._killers.add(task)
        task.add_done_callback(self._killers.discard)

    async def list_releases(self) -> list[Manifest]:
        try:
            return (await asyncio.to_thread(read_catalog, self.store)).published
        except StoreUnavailable as e:
            raise Unavailable(f"the object store cannot be reached ({e}); retry later") from e

    async def delete_release(self, name: str, *, dry_run: bool) -> tuple[DeletionPlan, int]:
        """-> (what goes, objects removed: 0 with dry_run)."""
        try:
            check_release_name(name)
        except ReleaseError as e:
            raise InvalidInput(str(e)) from e
        if any(j.spec.release == name and j.state not in TERMINAL for j in self.jobs.values()):
            raise FailedPrecondition(f"a job for release {name!r} is queued or running: cancel it first")
        try:
            plan, removed = await asyncio.to_thread(self._delete, name, dry_run)
        except ReleaseNotFound as e:
            raise NotFound(str(e)) from e
        except ReleaseBusy as e:
            raise FailedPrecondition(str(e)) from e
        except StoreUnavailable as e:
            raise Unavailable(str(e)) from e
        return plan, removed

    def _delete(self, name: str, dry_run: bool) -> tuple[DeletionPlan, int]:
        if dry_run:
            return plan_deletion(self.store, name), 0
        with Maintenance(self.store, f"release delete {name}") as maintenance:
            plan = plan_deletion(self.store, name)
            removed = delete_release(self.store, plan, maintenance, log=log.info)
        shutil.rmtree(self.work_root / RELEASE_COPIES / name, ignore_errors=True)  # as `release delete` does
        return plan, removed

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            if job.state != QUEUED:
                continue
            try:
                await self._run(job)
            except Exception:  # noqa: BLE001 - one job's failure must not stop the worker, and every job after it
                log.exception("job %s failed in the service", job.id)
                if job.process is not None and job.process.returncode is None:
                    _signal_group(job.process, signal.SIGKILL)
                if job.state not in TERMINAL:
                    job.state = FAILED
                    await job.publish({"message": "internal error in the trainer service while running the job"})
            finally:
                await job.settle()
                self._remove_job_files(job)  # they are in the release now, or were refused
                self._forget_old_jobs()

    def _job_dir(self, job_id: str) -> Path:
        """A knowledge job's files ("_" starts no release name, so no training run's work dir)."""
        return self.work_root / "_knowledge" / job_id

    def _write_job_files(self, job_id: str, spec: KnowledgeJobSpec) -> tuple[Path | None, Path | None]:
        """A knowledge job's documents and removals as JSON Lines: (documents, removals), None where it has none."""
        directory = self._job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        documents = removals = None
        if spec.documents:
            documents = directory / "documents.jsonl"
            with documents.open("w", encoding="utf-8") as out:
                for i, (source, text) in enumerate(spec.documents):
                    out.write(json.dumps({"text": text, "source": source or f"document {i + 1}"}) + "\n")
        if spec.remove_ids or spec.remove_matches:
            removals = directory / "removals.jsonl"
            with removals.open("w", encoding="utf-8") as out:
                for key, values in (("id", spec.remove_ids), ("match", spec.remove_matches)):
                    out.writelines(json.dumps({key: value}) + "\n" for value in values)
        return documents, removals

    def _remove_job_files(self, job: Job) -> None:
        shutil.rmtree(self._job_dir(job.id), ignore_errors=True)

    def _free_disk(self, job: Job) -> None:
        """What a published job leaves that nothing reads again, which filled the service's volume job
        by job: a training run's checkpoints and weights (its release is published: submitted again, it
        is refused; its curve and history stay), and local copies of releases other than the last
        two that knowledge jobs derived from (a parent's weights and index, downloaded for each)."""
        if isinstance(job.spec, TrainingJobSpec):
            run = self._run_dir(job.spec)
            for part in ("checkpoints", "model"):
                shutil.rmtree(run / part, ignore_errors=True)
            return
        if job.spec.parent in self._recent_parents:
            self._recent_parents.remove(job.spec.parent)
        self._recent_parents.append(job.spec.parent)
        copies = self.work_root / RELEASE_COPIES
        for copy in copies.iterdir() if copies.is_dir() else ():
            if copy.name not in self._recent_parents:
                shutil.rmtree(copy, ignore_errors=True)

    def _run_dir(self, spec: TrainingJobSpec) -> Path:
        """A training run's work directory: the same training resumes its checkpoints; another for the
        same release (corrected after a failure or a cancel) starts its own, where it was told to use
        another --work-dir, which a gRPC client cannot give. Autocast is a run setting, and the codec
        and index kind are the publication's: a run resumed with others publishes with them."""
        training = {k: v for k, v in dataclasses.asdict(spec).items()
                    if k not in ("release", "bf16", "codec", "index_kind")}
        digest = hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:10]
        return self.work_root / f"{spec.release}-{digest}"

    def _command(self, job: Job) -> list[str]:
        spec = job.spec
        store = s3_arguments(self.s3)
        if isinstance(spec, KnowledgeJobSpec):
            cli = [self.python, "-m", "memory3.services.cli.main", "kb"]
            where = ["--release", spec.parent, "--name", spec.release, *store,
                     "--cache-dir", str(self.work_root / RELEASE_COPIES)]
            if job.documents is None:
                return [*cli, "remove", *where, f"--from={job.removals}"]
            return [*cli, "add", str(job.documents), "--events", *where, *self._device_args(),
                    *((f"--remove-from={job.removals}",) if job.removals else ()),
                    *(("--index-kind", spec.index_kind) if spec.index_kind else ())]
        cmd = [self.python, "-m", "memory3.services.cli.main", "train", "--release", spec.release,
               "--preset", spec.preset, "--seed", str(spec.seed), "--codec", spec.codec,
               "--index-kind", spec.index_kind, "--events",
               "--work-dir", str(self._run_dir(spec)), *store, *self._device_args()]
        if spec.bf16 is not None:
            cmd.append("--bf16" if spec.bf16 else "--no-bf16")
        if spec.stage3_steps is not None:
            cmd += ["--stage3-steps", str(spec.stage3_steps)]
        if spec.attention_weight is not None:
            cmd += ["--attention-weight", repr(spec.attention_weight)]
        return [*cmd, "--quick"] if spec.quick else cmd

    def _device_args(self) -> list[str]:
        return [] if self.device is None else ["--device", self.device]

    async def _run(self, job: Job) -> None:
        env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": self.s3.access_key,
               "MEMORY3_S3_SECRET_KEY": self.s3.secret_key, "PYTHONUNBUFFERED": "1"}
        job.state = RUNNING
        started = datetime.now(UTC).replace(microsecond=0)  # as precise as a manifest's `created`
        await job.publish({"message": "started"})
        job.process = await asyncio.create_subprocess_exec(
            *self._command(job), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
            limit=MAX_OUTPUT_LINE, start_new_session=True)  # its own process group: `_signal_group`
        job.pid = job.process.pid
        if job.record is not None:
            with contextlib.suppress(OSError):  # so that a restarted service stops a child left running
                job.save()
        if job.state == CANCELLED:  # cancelled while the child started: it had no process to stop yet
            self._terminate(job.process)
        stderr_tail: deque[str] = deque(maxlen=20)

        async def drain_stderr() -> None:
            """Read in chunks, not lines: a line over the reader's limit (a progress bar's carriage returns,
            never a newline) ended a line reader, nobody read the pipe any more, and the child, and every
            job queued behind it, hung once it was full."""
            partial = b""
            while chunk := await job.process.stderr.read(1 << 16):
                *lines, partial = (partial + chunk).replace(b"\r", b"\n").split(b"\n")
                partial = partial[-MAX_OUTPUT_LINE:]
                stderr_tail.extend(line.decode(errors="replace").rstrip()[:MAX_MESSAGE_CHARS] for line in lines
                                   if line.strip())
            if partial.strip():
                stderr_tail.append(partial.decode(errors="replace").rstrip()[:MAX_MESSAGE_CHARS])

        drain = asyncio.create_task(drain_stderr())
        async for line in job.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict):  # a library's stray output, such as a bare number, is no event
                continue
            if event.get("release"):
                job.release = event["release"]
            await job.publish(event)
        code = await job.process.wait()
        job.pid = None
        await drain
        if job.state == CANCELLED:
            if await self._published_since(job.spec.release, started):
                job.state, job.release = SUCCEEDED, job.spec.release
                await job.publish({"message": f"release {job.release!r} was published before the cancel reached the "
                                   "job, which succeeded: the release is kept (`memory3 release delete "
                                   f"{job.release}` removes it)", "release": job.release})
            return
        if code == 0:
            job.state = SUCCEEDED
            job.release = job.release or job.spec.release
            await asyncio.to_thread(self._free_disk, job)
            await job.publish({"message": "release published", "release": job.release})
        else:
            job.state = FAILED
            reason = next((line for line in reversed(stderr_tail) if "error" in line.lower()), None)
            await job.publish({"message": reason or f"the job exited with code {code}: "
                               + " | ".join(list(stderr_tail)[-3:])})


def _stop_orphan(pid: int | None) -> None:
    """Kill the process group of a job's child that a stopped service left running (its process ran in
    a session of its own, which the service's end did not reach): resubmitted, the job would train in the
    same work directory beside it, each removing the other's checkpoints, and the orphan might still
    publish. Only a `memory3` process is taken for it: the pid may have been reused since."""
    if pid is None:
        return
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return  # gone (or not Linux: nothing to ask)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if b"memory3" in command and os.getpgid(pid) == pid:
            log.warning("stopping process group %d, a job's child the service left running when it stopped", pid)
            os.killpg(pid, signal.SIGKILL)


def _signal_group(process: asyncio.subprocess.Process, signum: int) -> None:
    """`signum` to the job's child and every process of its group (it leads one: `start_new_session`)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group has ended
        os.killpg(process.pid, signum)
