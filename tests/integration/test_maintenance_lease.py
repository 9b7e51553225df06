"""Maintenance leases on a real S3 server: a `release gc` or `release delete` that lost its lease
(stopped past its expiry, or the store out of reach) removes nothing more, so that a publication
that began once it expired keeps every object it lists."""

import threading
import time

import pytest
from test_publication_lease import clock_jumped, texts_of

from memory3.services.release import catalog as catalog_module
from memory3.services.release import lease as lease_module
from memory3.services.release.catalog import collect_unlisted, delete_release, plan_collection, plan_deletion
from memory3.services.release.lease import (
    LEASE_TTL_S,
    REMOVAL_MARGIN_S,
    Maintenance,
    MaintenanceLapsed,
    Publication,
    live_leases,
    maintenance_leases,
)
from memory3.services.release.manifest import MEMORIES_PREFIX, release_key
from memory3.services.release.reader import Release, read_manifest
from memory3.services.storage.object_store import StoreUnavailable
from memory3.services.trainer.releases import kb_add

pytestmark = pytest.mark.integration


@pytest.fixture
def no_heartbeat(monkeypatch):
    """A holder whose heartbeat thread does not get to run: as a stopped process's does not."""
    monkeypatch.setattr(lease_module, "LEASE_RENEW_S", 3600.0)
    monkeypatch.setattr(lease_module, "LEASE_SETTLE_S", 0.0)
    monkeypatch.setattr(lease_module, "MAINTENANCE_POLL_S", 0.05)


def add(store, document, name, tmp_path, embedder, **kwargs):
    return kb_add(store, "base", [document], name, tmp_path / "cache", embedder=embedder, progress=False, **kwargs)


def readable(store, name, tmp_path) -> int:
    """How many memories of `name` can be fetched: every file is checked against its manifest."""
    release = Release.open(store, name, tmp_path / "check")
    return len(release.fetch_memories(list(release.by_id)))


def test_a_gc_stopped_past_its_lease_removes_nothing_a_publication_since_lists(base, document, tmp_path, embedder,
                                                                             monkeypatch, no_heartbeat):
    """A retried publication uploads the memory a failed one left (content hashes), which a gc planned
    to remove. The gc was stopped past its lease's expiry, so the retry did not wait for it and
    published; the gc, resumed, removed the memory the new release lists."""
    def fail(done, total):
        raise RuntimeError("cancelled")
    with pytest.raises(RuntimeError, match="cancelled"):
        add(base, document, "child", tmp_path, embedder, on_encoded=fail)

    with Maintenance(base, "release gc") as held:
        plan = plan_collection(base)
        assert plan.count == 1  # the memory of the added text, left by the failed publication
        monkeypatch.setattr(lease_module, "datetime", clock_jumped(LEASE_TTL_S + 5))  # stopped, then resumed
        add(base, document, "child", tmp_path, embedder)  # its lease expired: the retry does not wait
        with pytest.raises(MaintenanceLapsed) as lapsed:
            collect_unlisted(base, plan, held)
    assert readable(base, "child", tmp_path) == read_manifest(base, "child").memory_bank["count"]
    assert str(lapsed.value).startswith("`release gc` stopped removing: its lease lapsed, no heartbeat was written "
                                        "for 180 s")
    assert str(lapsed.value).endswith("It removed 0 of the 1 objects it planned to; the others stay: run "
                                      "`memory3 release gc` again (it plans anew, and keeps what releases published "
                                      "since list).")
    assert maintenance_leases(base) == []


def test_a_delete_stopped_past_its_lease_leaves_the_release_published_anew_under_its_name(
        base, document, tmp_path, embedder, monkeypatch, no_heartbeat):
    """Once its manifest was removed the name was free; the deletion was stopped past its lease's
    expiry, and the release was published again meanwhile (the same files and memories). The
    deletion, resumed, removed the new release's files and memories: listed, and unreadable."""
    add(base, document, "child", tmp_path, embedder)
    added = set(read_manifest(base, "child").files)

    def stopped_then_published_anew(message):
        if "unpublished" in message:
            monkeypatch.setattr(lease_module, "datetime", clock_jumped(LEASE_TTL_S + 5))
            add(base, document, "child", tmp_path, embedder)

    with Maintenance(base, "release delete child") as held:
        plan = plan_deletion(base, "child")
        assert len(plan.memory_keys) == 1 and plan.listed_by == ["base"]
        with pytest.raises(MaintenanceLapsed) as lapsed:
            delete_release(base, plan, held, log=stopped_then_published_anew)
    assert set(read_manifest(base, "child").files) == added
    assert readable(base, "child", tmp_path) == read_manifest(base, "child").memory_bank["count"]
    assert document.read_text().strip() in texts_of(base, "child", tmp_path)
    assert str(lapsed.value).endswith(
        "It removed 1 objects of release 'child', its manifest first (it is unpublished); the rest stay, memories "
        "included. If `memory3 release list` shows 'child' published, it was published anew since then: leave it. "
        "Otherwise run `memory3 release delete child` again, then `memory3 release gc` for the memories no "
        "release lists.")


def test_a_removal_stops_at_the_batch_after_its_lease_lapsed(base, monkeypatch, no_heartbeat):
    """The lease is checked before each batch of deletions, not once before them all."""
    monkeypatch.setattr(catalog_module, "REMOVAL_BATCH", 1)
    strays = [f"{MEMORIES_PREFIX}0123abcd/{n}/x" for n in ("aa", "bb", "cc")]
    for key in strays:
        base.put_bytes(key, b"left by a cancelled publication")

    def stopped(count):
        monkeypatch.setattr(lease_module, "datetime", clock_jumped(LEASE_TTL_S + 5))

    with Maintenance(base, "release gc") as held, \
            pytest.raises(MaintenanceLapsed, match="It removed 1 of the 3 objects it planned to"):
        collect_unlisted(base, plan_collection(base), held, progress=stopped)
    assert [base.exists(key) for key in strays] == [False, True, True]


def test_a_late_heartbeat_does_not_bring_back_a_lapsed_maintenance_lease(bucket, monkeypatch):
    """The heartbeat of a remover stopped past its lease's expiry wrote the lease back, though a
    publication had seen it expire and gone ahead, and another remover had removed it."""
    monkeypatch.setattr(lease_module, "LEASE_RENEW_S", 0.05)
    with Maintenance(bucket, "release gc") as held:
        monkeypatch.setattr(lease_module, "datetime", clock_jumped(LEASE_TTL_S + 5))
        bucket.remove_keys([held.lease.key])  # by a remover that saw it expire
        lease_module.time.sleep(0.5)  # heartbeats are due
        assert not bucket.exists(held.lease.key) and held.lapsed()
        with pytest.raises(MaintenanceLapsed, match="its lease lapsed, no heartbeat was written for 180 s"):
            held.check_held(lambda: "")


def test_a_remover_whose_heartbeats_fail_stops_before_its_lease_can_expire(base, monkeypatch):
    """With the store refusing its heartbeats, a remover went on deleting past its lease's expiry,
    the last batch started just before it ending after others saw it expire."""
    monkeypatch.setattr(lease_module, "LEASE_RENEW_S", 0.05)
    stray = f"{MEMORIES_PREFIX}0123abcd/aa/x"
    base.put_bytes(stray, b"left by a cancelled publication")
    put = base.put_bytes

    def refuse_leases(key, data, *args):
        if key.startswith(lease_module.MAINTENANCE_PREFIX):
            raise StoreUnavailable(f"put {key}: the object store refused the request (SlowDown)")
        put(key, data, *args)

    with Maintenance(base, "release gc") as held:
        plan = plan_collection(base)
        monkeypatch.setattr(base, "put_bytes", refuse_leases)
        monkeypatch.setattr(lease_module, "datetime", clock_jumped(LEASE_TTL_S - REMOVAL_MARGIN_S + 5))
        lease_module.time.sleep(0.3)  # heartbeats are due, and refused
        with pytest.raises(MaintenanceLapsed, match=r"its lease is about to lapse, its last heartbeat is 9\d s old"):
            collect_unlisted(base, plan, held)
    assert base.exists(stray)


@pytest.mark.parametrize("taken", ["removed", "overwritten"])
def test_a_remover_whose_lease_left_the_bucket_removes_nothing(base, taken, no_heartbeat):
    """Publications wait only for the maintenance leases they find: one removed (by a remover whose
    clock saw it expire) or overwritten holds none of them back."""
    stray = f"{MEMORIES_PREFIX}0123abcd/aa/x"
    base.put_bytes(stray, b"left by a cancelled publication")
    with Maintenance(base, "release gc") as held:
        plan = plan_collection(base)
        if taken == "removed":
            base.remove_keys([held.lease.key])
        else:
            base.put_bytes(held.lease.key, b'{"holder": "another host pid 7"}')
        why = "was removed from the bucket" if taken == "removed" else "in the bucket is no longer the one it wrote"
        with pytest.raises(MaintenanceLapsed, match=why):
            collect_unlisted(base, plan, held)
    assert base.exists(stray)


def test_deleting_leftovers_keeps_the_lease_of_a_publication_of_the_name_that_began_meanwhile(bucket, monkeypatch):
    """A publication of the name that began just after the deletion looked for one wrote its lease,
    then waited for the deletion, which removed that lease with the leftovers: the name looked free
    to the next publisher of it, and the first one failed at its end (its lease gone)."""
    monkeypatch.setattr(lease_module, "LEASE_SETTLE_S", 0.0)
    monkeypatch.setattr(lease_module, "MAINTENANCE_POLL_S", 0.05)
    bucket.put_bytes(release_key("child", "index.faiss"), b"half")  # left by a failed publication
    publication = Publication(bucket, "child")
    waiting = threading.Thread(target=publication.acquire)
    looked = catalog_module.live_leases

    def then_a_publication_begins(store, name):
        found = looked(store, name)
        waiting.start()  # it writes its lease, then waits for the deletion
        while not store.exists(publication.lease.key):
            time.sleep(0.01)
        return found

    monkeypatch.setattr(catalog_module, "live_leases", then_a_publication_begins)
    try:
        with Maintenance(bucket, "release delete child") as held:
            delete_release(bucket, plan_deletion(bucket, "child"), held)
        waiting.join(30)
        assert not waiting.is_alive() and publication.holds()
        assert [lease.token for lease in live_leases(bucket, "child")] == [publication.lease.token]
    finally:
        waiting.join(30)
        publication.release()
