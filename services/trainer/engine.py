"""Training and knowledge jobs behind the TrainerService: protocol-neutral, asyncio.

A training job runs `memory3 train --events` in a child process (the same code as the CLI), one
job at a time; its JSON-lines progress becomes the job's event history, which any number of
watchers replay and then follow. Cancelling terminates the child; its checkpoints stay, so
submitting the same spec again resumes. A knowledge job runs `memory3 kb add` (or `kb remove`)
the same way, on documents the request carried, written to the job's directory as JSON Lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from memory3.model.config import PRESETS

from ..release.catalog import DeletionPlan, ReleaseBusy, delete_release, plan_deletion, read_catalog
from ..release.manifest import Manifest, ReleaseError, ReleaseNotFound, check_release_name, release_key
from ..retrieval.index import check_index_choice
from ..rpc.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound, ResourceExhausted, Unavailable
from ..storage.object_store import ObjectStore, S3Config, StoreUnavailable

log = logging.getLogger("memory3.trainer")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
CODECS = ("fp16", "bf16", "int8", "vq")


@dataclass(frozen=True)
class TrainingJobSpec:
    release: str
    preset: str = "small"
    quick: bool = False
    seed: int = 0
    codec: str = "bf16"
    bf16: bool | None = None  # None: on where the CPU computes bf16 natively
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
        if self.stage3_steps is not None and self.stage3_steps < 0:
            raise InvalidInput(f"stage3_steps is {self.stage3_steps}; give a number of steps >= 0")
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
    events: list[dict] = field(default_factory=list)
    release: str | None = None
    process: asyncio.subprocess.Process | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    documents: Path | None = None  # a knowledge job's documents, on disk from submission to the job's end

    async def publish(self, event: dict) -> None:
        async with self.changed:
            self.events.append({"state": self.state, **event})
            self.changed.notify_all()


class TrainingJobManager:
    def __init__(self, s3: S3Config, work_root: Path, *, max_queued: int = 16, python: str = sys.executable) -> None:
        self.s3, self.work_root, self.max_queued, self.python = s3, work_root, max_queued, python
        self.store = ObjectStore(s3)
        self.jobs: dict[str, Job] = {}
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.store.ensure_bucket)  # readiness: the store is reachable
        self.worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        for job in self.jobs.values():
            if job.state in (QUEUED, RUNNING):
                await self.cancel(job.id)
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker

    async def submit(self, spec: TrainingJobSpec | KnowledgeJobSpec) -> str:
        spec.validate()
        if any(j.spec.release == spec.release and j.state not in TERMINAL for j in self.jobs.values()):
            raise AlreadyExists(f"a job for release {spec.release!r} is already queued or running")
        if await asyncio.to_thread(self.store.exists, release_key(spec.release, "manifest.json")):
            raise AlreadyExists(f"release {spec.release!r} already exists; releases are immutable")
        if isinstance(spec, KnowledgeJobSpec) and not await asyncio.to_thread(
                self.store.exists, release_key(spec.parent, "manifest.json")):
            raise NotFound(f"parent release {spec.parent!r} does not exist (no manifest in bucket {self.s3.bucket})")
        if self.queue.qsize() >= self.max_queued:
            raise ResourceExhausted(f"{self.max_queued} jobs are already queued; try again later")
        job = Job(id=uuid.uuid4().hex[:12], spec=spec)
        if isinstance(spec, KnowledgeJobSpec) and spec.documents:
            # On disk, not in the job list that the service keeps: up to MAX_KNOWLEDGE_BYTES a job.
            job.documents = await asyncio.to_thread(self._write_documents, job.id, spec.documents)
            job.spec = dataclasses.replace(spec, documents=())
        self.jobs[job.id] = job
        await job.publish({"message": f"queued (position {self.queue.qsize() + 1})"})
        await self.queue.put(job)
        return job.id

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise NotFound(f"no job {job_id!r}")
        return self.jobs[job_id]

    async def watch(self, job_id: str) -> AsyncIterator[dict]:
        job = self.get(job_id)
        sent = 0
        while True:
            async with job.changed:
                await job.changed.wait_for(lambda n=sent: len(job.events) > n or job.state in TERMINAL)
                new = job.events[sent:]
                done = job.state in TERMINAL
            for event in new:
                yield event
            sent += len(new)
            if done and sent == len(job.events):
                return

    async def cancel(self, job_id: str) -> str:
        job = self.get(job_id)
        if job.state in TERMINAL:
            return job.state
        if job.process is not None and job.process.returncode is None:
            job.process.terminate()
        elif job.documents is not None:  # queued: it will not run
            shutil.rmtree(job.documents.parent, ignore_errors=True)
        job.state = CANCELLED
        await job.publish({"message": "cancelled"})
        return job.state

    async def list_releases(self) -> list[Manifest]:
        return (await asyncio.to_thread(read_catalog, self.store)).published

    async def delete_release(self, name: str, *, dry_run: bool) -> tuple[DeletionPlan, int]:
        """-> (what goes, objects removed: 0 with dry_run)."""
        try:
            check_release_name(name)
        except ReleaseError as e:
            raise InvalidInput(str(e)) from e
        if any(j.spec.release == name and j.state not in TERMINAL for j in self.jobs.values()):
            raise FailedPrecondition(f"a job for release {name!r} is queued or running: cancel it first")
        try:
            plan = await asyncio.to_thread(plan_deletion, self.store, name)
            removed = 0 if dry_run else await asyncio.to_thread(delete_release, self.store, plan, log=log.info)
        except ReleaseNotFound as e:
            raise NotFound(str(e)) from e
        except ReleaseBusy as e:
            raise FailedPrecondition(str(e)) from e
        except StoreUnavailable as e:
            raise Unavailable(str(e)) from e
        return plan, removed

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            if job.state == QUEUED:
                await self._run(job)

    def _write_documents(self, job_id: str, documents: tuple[tuple[str, str], ...]) -> Path:
        """A knowledge job's documents as JSON Lines, in a directory of its own ("_" starts no
        release name, so no training run's work dir)."""
        path = self.work_root / "_knowledge" / job_id / "documents.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as out:
            for i, (source, text) in enumerate(documents):
                out.write(json.dumps({"text": text, "source": source or f"document {i + 1}"}) + "\n")
        return path

    def _command(self, job: Job) -> list[str]:
        spec = job.spec
        store = ["--s3-endpoint", self.s3.endpoint, "--s3-bucket", self.s3.bucket]
        if isinstance(spec, KnowledgeJobSpec):
            cli = [self.python, "-m", "memory3.services.cli.main", "kb"]
            where = ["--release", spec.parent, "--name", spec.release, *store,
                     "--cache-dir", str(self.work_root / "_releases")]
            if job.documents is None:
                return [*cli, "remove", *where, *(a for i in spec.remove_ids for a in ("--id", i)),
                        *(a for m in spec.remove_matches for a in ("--match", m))]
            return [*cli, "add", str(job.documents), "--events", *where,
                    *(a for i in spec.remove_ids for a in ("--remove-id", i)),
                    *(a for m in spec.remove_matches for a in ("--remove-match", m)),
                    *(("--index-kind", spec.index_kind) if spec.index_kind else ())]
        cmd = [self.python, "-m", "memory3.services.cli.main", "train", "--release", spec.release,
               "--preset", spec.preset, "--seed", str(spec.seed), "--codec", spec.codec,
               "--index-kind", spec.index_kind, "--events",
               "--work-dir", str(self.work_root / spec.release), *store]
        if spec.bf16 is not None:
            cmd.append("--bf16" if spec.bf16 else "--no-bf16")
        if spec.stage3_steps is not None:
            cmd += ["--stage3-steps", str(spec.stage3_steps)]
        if spec.attention_weight is not None:
            cmd += ["--attention-weight", repr(spec.attention_weight)]
        return [*cmd, "--quick"] if spec.quick else cmd

    async def _run(self, job: Job) -> None:
        env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": self.s3.access_key,
               "MEMORY3_S3_SECRET_KEY": self.s3.secret_key, "PYTHONUNBUFFERED": "1"}
        job.state = RUNNING
        await job.publish({"message": "started"})
        job.process = await asyncio.create_subprocess_exec(
            *self._command(job), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        stderr_tail: deque[str] = deque(maxlen=20)

        async def drain_stderr() -> None:
            async for line in job.process.stderr:
                stderr_tail.append(line.decode(errors="replace").rstrip())

        drain = asyncio.create_task(drain_stderr())
        async for line in job.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("release"):
                job.release = event["release"]
            await job.publish(event)
        code = await job.process.wait()
        await drain
        if job.documents is not None:  # they are in the release now, or were refused
            shutil.rmtree(job.documents.parent, ignore_errors=True)
        if job.state == CANCELLED:
            return
        if code == 0:
            job.state = SUCCEEDED
            job.release = job.release or job.spec.release
            await job.publish({"message": "release published", "release": job.release})
        else:
            job.state = FAILED
            reason = next((line for line in reversed(stderr_tail) if "error" in line.lower()), None)
            await job.publish({"message": reason or f"the job exited with code {code}: "
                               + " | ".join(list(stderr_tail)[-3:])})
