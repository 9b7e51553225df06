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
within a fraction of `LEASE_TTL_S` (NTP does far better).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from ..storage.object_store import ObjectNotFound, ObjectStore, StoreError
from .manifest import ReleaseError, release_key

log = logging.getLogger("memory3.release")
LEASE_DIR = "publishing/"
LEASE_RENEW_S = 20.0
LEASE_TTL_S = 180.0
LEASE_SETTLE_S = 1.0  # well above one PUT's time: see Publication.acquire


class ReleaseBusy(ReleaseError):
    """The name is being published, or a deletion could remove what a publication needs."""


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

    def to_json(self) -> bytes:
        return json.dumps({"token": self.token, "holder": self.holder, "started": self.started,
                           "heartbeat": self.heartbeat}).encode()


def leases(store: ObjectStore, name: str) -> list[Lease]:
    """The leases stored for `name`, live or not; one that cannot be read counts as live now (a
    deletion waits for it rather than guess), one removed while listed is skipped."""
    found = []
    for key in store.list_keys(release_key(name, LEASE_DIR)):
        token = key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            data = json.loads(store.get_bytes(key))
            found.append(Lease(name, token, str(data["holder"]), str(data["started"]), str(data["heartbeat"])))
        except ObjectNotFound:
            continue
        except (ValueError, KeyError, TypeError):
            now = _now()
            found.append(Lease(name, token, f"an unreadable lease ({key})", now, now))
    return found


def live_leases(store: ObjectStore, name: str) -> list[Lease]:
    now = datetime.now(UTC)
    return [lease for lease in leases(store, name) if lease.live(now)]


class Publication:
    """Holds `name` while a release is written: `acquire()`, then `release()` (after the manifest,
    or on failure). A heartbeat thread keeps the lease live in between."""

    def __init__(self, store: ObjectStore, name: str) -> None:
        self.store, self.name = store, name
        now = _now()
        self.lease = Lease(name, uuid.uuid4().hex, f"{socket.gethostname()} pid {os.getpid()}", now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Write the lease, then give up (ReleaseBusy, the lease removed) unless it is the oldest live
        one, now and `LEASE_SETTLE_S` later: a rival that stamped its lease just before this one but
        wrote it just after this one's listing shows by then, and it is this one that gives up."""
        now = _now()
        self.lease = Lease(self.name, self.lease.token, self.lease.holder, now, now)
        self.store.put_bytes(self.lease.key, self.lease.to_json(), "application/json")
        try:
            self._check_first()
            time.sleep(LEASE_SETTLE_S)
            rivals = self._check_first()
            # Anything else under the name was left by publishers that died (expired leases included):
            # removed, so that the release holds only what this one writes.
            keep = {self.lease.key, *(lease.key for lease in rivals)}
            leftovers = [key for key in self.store.list_keys(release_key(self.name, "")) if key not in keep]
            if leftovers:
                log.warning("removing %d objects a failed publication of %r left", len(leftovers), self.name)
                self.store.remove_keys(leftovers)
        except BaseException:  # an outage, Ctrl-C: the lease goes now rather than in LEASE_TTL_S
            self._remove()
            raise
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def _check_first(self) -> list[Lease]:
        """The other live leases, none of which comes first; ReleaseBusy if one does."""
        rivals = [lease for lease in live_leases(self.store, self.name) if lease.token != self.lease.token]
        first = min([self.lease, *rivals], key=lambda lease: (lease.started, lease.token))
        if first is not self.lease:
            raise ReleaseBusy(f"release {self.name!r} is being published by {first.describe()}; wait for it to "
                              "finish, or choose another name")
        return rivals

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=LEASE_RENEW_S)
        self._remove()

    def _remove(self) -> None:
        try:
            self.store.remove_keys([self.lease.key])
        except StoreError as e:  # it expires by itself
            log.warning("could not remove the publication lease of %r: %s", self.name, e)

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            self.lease = Lease(self.name, self.lease.token, self.lease.holder, self.lease.started, _now())
            try:
                self.store.put_bytes(self.lease.key, self.lease.to_json(), "application/json")
            except StoreError as e:  # the next beat tries again; the lease lasts LEASE_TTL_S
                log.warning("publication lease of %r not renewed: %s", self.name, e)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
