"""Publication leases: one publisher per release name, and no deletion of what it is writing.

S3 has no lock, and a check that a name is free, made before hours of encoding, guards nothing after
it: two publishers of one name would both write, the later manifest replacing the earlier
("immutable" releases overwritten), and a failing one would remove the other's release with its own
leftovers. A deletion of "leftovers" could likewise remove the files of a publication still running,
which would then publish a manifest over files that are gone.

So a publisher writes a lease object under the release's prefix,
`releases/<name>/publishing/<token>.json`, and rewrites it every `LEASE_RENEW_S` while it works (a
heartbeat). A lease is live while its last heartbeat is younger than `LEASE_TTL_S`; a process killed
without cleaning up leaves one that expires. After writing its lease, a publisher lists the leases
of the name: of the live ones, the oldest (then the smallest token) holds the name, and every other
publisher gives up before writing anything (each looks twice, `LEASE_SETTLE_S` apart, to see rivals
whose writes crossed its own). This needs only what S3 and MinIO guarantee: a read or a listing
after a write sees it. Heartbeats are compared with the reader's clock: hosts must agree on the time
within a fraction of `LEASE_TTL_S` (NTP does far better). A lease is written whole (a PUT), so one
that cannot be read is damaged or of another format, never half-written: it counts as expired, as
it would otherwise hold its name, and every deletion, for ever.

A publisher that went `LEASE_TTL_S` without writing a heartbeat (its process stopped, a host
suspended, the store out of reach) has lost its lease: others saw it expire and may have taken the
name, removing what it wrote and writing files of the same names. Such a lease is never written
back; the publisher gives up without removing anything, as what is under the name may be another's.
A publication that finds a manifest under its name once it holds the lease gives up too: a
publisher of the same name finished in between, and its release is not a failed one's leftovers.

Removing memories (`release delete` of a published release, `release gc`) takes a maintenance lease,
`maintenance/<token>.json`, before it decides what to remove: a publication that began after that
decision could upload a memory the plan removes (keys are content hashes, so a retried or repeated
publication writes keys a failed one left), and would publish a manifest listing it. Both sides write
their lease, then look for the other's: of two that cross, at least one sees the other. The remover
that sees a publication gives up (as before); a publisher that sees a removal waits for it to end,
its own lease renewed meanwhile.

A remover's lease lapses as a publisher's does, and a publication that began once it expired did
not wait: it may list a memory the plan removes (a retried publication uploads the keys a failed one
left), or publish a release under the name being deleted, with files of the same names. So the
remover checks its lease before each batch of deletions (`Maintenance.check_held`): not lapsed,
still in the bucket as it wrote it, and young enough that the batch ends well before it could expire
(`REMOVAL_MARGIN_S`, which a store out of reach for that long also trips). One that fails stops
there, says what it removed and what is left, and never writes its lease back. What this leaves
open: a remover stopped between its last check and its batch's request (or whose request the
network delays past its expiry) still deletes once it resumes. Closing that needs the store to
refuse the request itself, a fencing token or a condition on the lease object checked with each
deletion, which S3 does not offer (its conditional deletes compare the object deleted, not another).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from ..storage.object_store import ObjectNotFound, ObjectStore, StoreError
from .manifest import MANIFEST_FILE, ReleaseError, ReleaseExists, release_key

log = logging.getLogger("memory3.release")
LEASE_DIR = "publishing/"
MAINTENANCE_PREFIX = "maintenance/"
LEASE_RENEW_S = 20.0
LEASE_TTL_S = 180.0
LEASE_SETTLE_S = 1.0  # well above one PUT's time: see Publication.acquire
MAINTENANCE_POLL_S = 5.0  # how often a publisher looks again while memories are removed
REMOVAL_MARGIN_S = 90.0  # life a maintenance lease must have left to start a batch of deletions


class ReleaseBusy(ReleaseError):
    """The name is being published, or a deletion could remove what a publication needs."""


class MaintenanceLapsed(ReleaseBusy):
    """A remover's lease lapsed or is no longer its own: it stopped before removing anything more,
    as a publication that began since may list what it was about to remove."""


@dataclass(frozen=True)
class Lease:
    """A publisher's claim on a release name, as stored."""

    name: str
    token: str
    holder: str  # host and process, for people
    started: str  # ISO time, UTC
    heartbeat: str  # ISO time, UTC

    @property
    def key(self) -> str:
        return release_key(self.name, f"{LEASE_DIR}{self.token}.json")

    def age_s(self, now: datetime | None = None) -> float:
        """Seconds since the last heartbeat."""
        return ((now or datetime.now(UTC)) - datetime.fromisoformat(self.heartbeat)).total_seconds()

    def live(self, now: datetime | None = None) -> bool:
        return self.age_s(now) < LEASE_TTL_S

    def describe(self) -> str:
        return f"{self.holder}, since {self.started} (last heartbeat {self.age_s():.0f} s ago)"

    def expiry(self) -> str:
        """When it expires unless renewed, for people who may wait for a stopped process."""
        return f"its lease expires in {max(LEASE_TTL_S - self.age_s(), 0.0):.0f} s unless renewed"

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "token": self.token, "holder": self.holder, "started": self.started,
                           "heartbeat": self.heartbeat}).encode()

    def renewed(self) -> Lease:
        return replace(self, heartbeat=_now())


@dataclass(frozen=True)
class MaintenanceLease(Lease):
    """A remover's claim: `name` says what it does (`release gc`, `release delete NAME`)."""

    @property
    def key(self) -> str:
        return f"{MAINTENANCE_PREFIX}{self.token}.json"


def leases(store: ObjectStore, name: str) -> list[Lease]:
    """The leases stored for `name`, live or not. One that cannot be read counts as expired: it
    would otherwise hold the name, and every deletion, for ever (publishers write theirs whole, a
    PUT, so it is damaged or of another format). One removed while listed is skipped."""
    return _read_leases(store, release_key(name, LEASE_DIR), lambda _data: name, Lease)


def maintenance_leases(store: ObjectStore) -> list[Lease]:
    """The maintenance leases stored, live or not. One that cannot be read counts as expired: every
    publication would otherwise wait for it for ever, and removers write theirs whole (a PUT)."""
    return _read_leases(store, MAINTENANCE_PREFIX, lambda data: str(data["name"]), MaintenanceLease)


def live_leases(store: ObjectStore, name: str) -> list[Lease]:
    return _live(leases(store, name))


def live_maintenance(store: ObjectStore) -> list[Lease]:
    return _live(maintenance_leases(store))


def _live(found: list[Lease]) -> list[Lease]:
    now = datetime.now(UTC)
    return [lease for lease in found if lease.live(now)]


def _read_leases(store: ObjectStore, prefix: str, name_of: Callable[[dict], str], kind: type[Lease]) -> list[Lease]:
    """Those that cannot be read (not JSON, a field missing, a heartbeat that is not an ISO time
    with its zone) come expired: see `leases`."""
    found = []
    for key in store.list_keys(prefix):
        token = key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            data = json.loads(store.get_bytes(key))
            lease = kind(name_of(data), token, str(data["holder"]), str(data["started"]), str(data["heartbeat"]))
            lease.age_s()  # the heartbeat is a time that can be compared with now
            found.append(lease)
        except ObjectNotFound:
            continue
        except (ValueError, KeyError, TypeError, AttributeError):
            stamp = datetime.fromtimestamp(0, UTC).isoformat()
            found.append(kind("?", token, f"an unreadable lease ({key})", stamp, stamp))
    return found


class _Held:
    """A lease this process holds: written, then renewed every `LEASE_RENEW_S` by a thread until
    `release()`."""

    def __init__(self, store: ObjectStore, lease: Lease) -> None:
        self.store, self.lease = store, lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False  # a heartbeat came too late: others may have seen the lease expire

    def lapsed(self) -> bool:
        """Whether others may have seen this lease expire since it was written, and gone ahead: no
        heartbeat was written for `LEASE_TTL_S` (the process stopped, the store out of reach)."""
        return self._lost or not self.lease.live()

    def _write(self) -> None:
        now = _now()
        self.lease = replace(self.lease, started=now, heartbeat=now)
        self.store.put_bytes(self.lease.key, self.lease.to_json(), "application/json")

    def _start_beating(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.lease.token[:8]}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=LEASE_RENEW_S)
        self._remove()
        if self._thread is not None and self._thread.is_alive():
            # A renewal still in flight (a slow store retries for longer than the wait) would land after
            # the removal: a live lease for LEASE_TTL_S that nobody holds (a name that looks published
            # to, a maintenance every publication waits for). The key goes again once it has ended.
            self._thread.join()
            self._remove()

    def _remove(self) -> None:
        try:
            self.store.remove_keys([self.lease.key])
        except StoreError as e:  # it expires by itself
            log.warning("could not remove the lease %s: %s", self.lease.key, e)

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S) and self._renew():
            pass

    def _renew(self) -> bool:
        """Writes a new heartbeat; False once the lease must not be renewed any more. `self.lease`
        is what the store holds: it changes once the write succeeded. A lapsed lease is never written
        back: whoever went ahead once it expired (a publisher that took the name, one that did not
        wait for a removal) would not see it come back, and this holder would go on over its work.
        One whose write landed too late is removed again."""
        if self.lapsed():
            self._lost = True
            return False
        was, renewed = self.lease, self.lease.renewed()
        try:
            self.store.put_bytes(renewed.key, renewed.to_json(), "application/json")
            self.lease = renewed
        except StoreError as e:  # the next beat tries again; the lease lasts LEASE_TTL_S
            log.warning("lease %s not renewed: %s", self.lease.key, e)
        if was.live():  # the previous heartbeat was still live when this one landed (or failed)
            return True
        self._lost = True
        if self.lease is renewed:
            self._remove()
        return False


class Publication(_Held):
    """Holds `name` while a release is written: `acquire()`, then `release()` (after the manifest,
    or on failure). A heartbeat thread keeps the lease live in between."""

    def __init__(self, store: ObjectStore, name: str) -> None:
        now = _now()
        super().__init__(store, Lease(name, uuid.uuid4().hex, _holder(), now, now))
        self.name = name

    def holds(self) -> bool:
        """Whether what is under the name is still this publisher's to remove: its lease has not
        lapsed and is still in the store (a publisher that took the name over removed it)."""
        return not self.lapsed() and self.store.exists(self.lease.key)

    def check_held(self) -> None:
        """ReleaseError once the lease lapsed: from then on nothing more is written under the name."""
        if self.lapsed():
            raise ReleaseError(
                f"the lease of the publication of release {self.name!r} lapsed: no heartbeat was written for "
                f"{LEASE_TTL_S:.0f} s (the process was stopped, or the object store out of reach), so another "
                "publisher may have taken the name; nothing was published: publish it again")

    def acquire(self) -> None:
        """Write the lease, then give up (ReleaseBusy, the lease removed) unless it is the oldest live
        one, now and `LEASE_SETTLE_S` later: a rival that stamped its lease just before this one but
        wrote it just after this one's listing shows by then, and it is this one that gives up. Then
        wait while memories are being removed (`Maintenance`)."""
        self._write()
        try:
            self._check_first()
            time.sleep(LEASE_SETTLE_S)
            rivals = self._check_first()
            keys = self.store.list_keys(release_key(self.name, ""))
            self._check_unpublished(keys)
            self.check_held()
            # Anything else under the name was left by publishers that died (expired leases included):
            # removed, so that the release holds only what this one writes.
            keep = {self.lease.key, *(lease.key for lease in rivals)}
            leftovers = [key for key in keys if key not in keep]
            if leftovers:
                log.warning("removing %d objects a failed publication of %r left", len(leftovers), self.name)
                self.store.remove_keys(leftovers)
            self._start_beating()
            self._wait_for_maintenance()
        except BaseException:  # an outage, Ctrl-C: the lease goes now rather than in LEASE_TTL_S
            self.release()
            raise

    def _check_unpublished(self, keys: list[str]) -> None:
        """A publisher of the same name may have finished after this one's check that the name was
        free, and before its lease: its release is published, not leftovers."""
        if release_key(self.name, MANIFEST_FILE) in keys:
            raise ReleaseExists(f"release {self.name!r} was published by another process while this one was "
                                "starting; releases are immutable, choose another name")

    def _check_first(self) -> list[Lease]:
        """The other live leases, none of which comes first; ReleaseBusy if one does."""
        rivals = [lease for lease in live_leases(self.store, self.name) if lease.token != self.lease.token]
        first = min([self.lease, *rivals], key=lambda lease: (lease.started, lease.token))
        if first is not self.lease:
            raise ReleaseBusy(f"release {self.name!r} is being published by {first.describe()}; wait for it to "
                              "finish, or choose another name")
        return rivals

    def _wait_for_maintenance(self) -> None:
        """Returns once no memories are being removed: this lease is visible from here on, so a
        removal that starts later sees it and gives up."""
        said = 0.0
        while running := live_maintenance(self.store):
            if time.monotonic() - said >= 60.0:
                said = time.monotonic()
                log.warning("publication of %r waits for %s (%s) to finish removing memories", self.name,
                            running[0].name, running[0].describe())
            time.sleep(MAINTENANCE_POLL_S)


class Maintenance(_Held):
    """Held while memories are removed, from before deciding which: `with Maintenance(store, what):`
    plan, then remove. Publications wait meanwhile. It gives up (ReleaseBusy) where a publication is
    running, through the plan's checks (catalog.py), which read the bucket after this lease is written.
    Removers do not exclude each other: each keeps what another release lists, so two at once can
    only leave memories for `release gc`. Each batch of deletions waits for `check_held`: a
    publication that began once this lease lapsed did not wait for it."""

    def __init__(self, store: ObjectStore, what: str) -> None:
        now = _now()
        super().__init__(store, MaintenanceLease(what, uuid.uuid4().hex, _holder(), now, now))
        self.since: float | None = None  # monotonic time the lease was written

    def __enter__(self) -> Maintenance:
        self._write()
        self.since = time.monotonic()
        try:
            self._start_beating()
            # Those of removers that died (expired) or cannot be read: each publication lists them.
            stale = [lease.key for lease in maintenance_leases(self.store) if not lease.live()]
            if stale:
                self.store.remove_keys(stale)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.since = None

    def check_covers(self, planned_at: float) -> None:
        """A plan made before this lease was written may miss publications that began since."""
        if self.since is None or planned_at < self.since:
            raise RuntimeError("memories are removed only under a Maintenance lease taken before the plan was made")

    def check_held(self, done: Callable[[], str]) -> None:
        """MaintenanceLapsed unless the next batch of deletions is covered: publications that began
        once the lease lapsed, or left the bucket, did not wait for this removal. `done()` says what
        was removed so far and what to run again, for the message."""
        why = self._why_not_held()
        if why is not None:
            self._lost = True  # never renewed again: see _Held._renew
            raise MaintenanceLapsed(f"`{self.lease.name}` stopped removing: {why}. A publication that began since "
                                    f"may list what it was about to remove. {done()}")

    def _why_not_held(self) -> str | None:
        """Why deletions must stop, or None. A lease closer than `REMOVAL_MARGIN_S` to its expiry
        counts as lapsed: the batch it would start could end after others saw it expire."""
        if self.lapsed():
            return (f"its lease lapsed, no heartbeat was written for {LEASE_TTL_S:.0f} s (the process was stopped, "
                    "or the object store out of reach)")
        age = self.lease.age_s()
        if age > LEASE_TTL_S - REMOVAL_MARGIN_S:
            return (f"its lease is about to lapse, its last heartbeat is {age:.0f} s old and it expires "
                    f"{LEASE_TTL_S:.0f} s after one (the object store did not take the heartbeats)")
        try:
            stored = json.loads(self.store.get_bytes(self.lease.key))
        except ObjectNotFound:
            return f"its lease {self.lease.key} was removed from the bucket, by a process that saw it expire"
        except ValueError:  # not JSON: overwritten
            stored = None
        if not isinstance(stored, dict) or \
                (stored.get("holder"), stored.get("started")) != (self.lease.holder, self.lease.started):
            return f"its lease {self.lease.key} in the bucket is no longer the one it wrote"
        return None


def _holder() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
