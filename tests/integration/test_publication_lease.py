"""Publication leases on a real S3 server: one publisher per release name, and no deletion of what a
running publication writes or is made from."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from memory3.services.release import lease as lease_module
from memory3.services.release.catalog import ReleaseBusy, delete_release, plan_collection, plan_deletion
from memory3.services.release.lease import (
    LEASE_DIR,
    LEASE_TTL_S,
    Lease,
    Maintenance,
    MaintenanceLease,
    Publication,
    leases,
    live_leases,
)
from memory3.services.release.manifest import ReleaseError, ReleaseExists, release_key
from memory3.services.release.reader import Release, read_manifest
from memory3.services.trainer.releases import kb_add

pytestmark = pytest.mark.integration


def add(store, document, name, tmp_path, embedder, **kwargs):
    return kb_add(store, "base", [document], name, tmp_path / "cache", embedder=embedder, progress=False, **kwargs)


def lease_of(store, name, token, *, age_s: float, started_age_s: float | None = None) -> Lease:
    """A lease as another publisher would have stored it, `age_s` after its last heartbeat."""
    now = datetime.now(UTC)
    beat = (now - timedelta(seconds=age_s)).isoformat()
    started = (now - timedelta(seconds=started_age_s if started_age_s is not None else age_s)).isoformat()
    lease = Lease(name, token, "another host pid 7", started, beat)
    store.put_bytes(lease.key, lease.to_json())
    return lease


def clock_jumped(seconds: float) -> type[datetime]:
    """The clock of lease.py, `seconds` later than the real one: as a process stopped that long
    (a frozen pod, a suspended host) finds it when it resumes, and as others see its lease."""
    class Later(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(seconds=seconds)
    return Later


def texts_of(store, name, tmp_path) -> list[str]:
    release = Release.open(store, name, tmp_path / "check")  # every file checked against the manifest
    return [row["text"] for row in release.references]


def test_a_name_being_published_is_neither_published_again_nor_deleted(base, document, tmp_path, embedder):
    holder = Publication(base, "child")
    holder.acquire()
    work = release_key("child", "model/config.json")
    base.put_bytes(work, b"{}")  # what the holder has written so far
    try:
        with pytest.raises(ReleaseBusy, match=r"'child' is being published by .*pid"):
            add(base, document, "child", tmp_path, embedder)
        with pytest.raises(ReleaseBusy, match="'child' is being published.*nothing was deleted"):
            plan_deletion(base, "child")  # its "leftovers" are the files of a running publication
        with pytest.raises(ReleaseBusy, match="child are being published and may list memories of 'base'"):
            plan_deletion(base, "base")
        assert base.exists(work) and [lease.token for lease in leases(base, "child")] == [holder.lease.token]
    finally:
        holder.release()
    assert leases(base, "child") == []

    add(base, document, "child", tmp_path, embedder)  # the name is free again; what was left goes
    assert read_manifest(base, "child").parent == "base"
    assert base.list_keys(release_key("child", LEASE_DIR)) == []


def test_a_lease_written_just_before_this_one_wins_even_if_it_shows_late(bucket, monkeypatch):
    """Writes that cross: the rival stamped its lease first but stored it after this publisher's
    first look; the second look, a moment later, sees it, and this publisher gives up."""
    real_sleep = lease_module.time.sleep

    def rival_lands(seconds):
        lease_of(bucket, "name", "rival", age_s=0.0, started_age_s=0.5)
        real_sleep(0)

    monkeypatch.setattr(lease_module.time, "sleep", rival_lands)
    loser = Publication(bucket, "name")
    with pytest.raises(ReleaseBusy, match="'name' is being published by another host pid 7"):
        loser.acquire()
    assert [lease.token for lease in leases(bucket, "name")] == ["rival"]

    later = Publication(bucket, "other")
    lease_of(bucket, "other", "rival", age_s=0.0, started_age_s=-5.0)  # stamped after: it gives up itself
    later.acquire()
    later.release()
    assert [lease.token for lease in leases(bucket, "other")] == ["rival"]


def test_the_leftovers_of_a_killed_publisher_expire_and_go(base, document, tmp_path, embedder):
    lease_of(base, "child", "dead", age_s=LEASE_TTL_S + 5)
    base.put_bytes(release_key("child", "index.faiss"), b"half")
    plan = plan_deletion(base, "child")  # expired: deletable
    assert not plan.published and len(plan.release_keys) == 2

    add(base, document, "child", tmp_path, embedder)  # or published over, without what it left
    assert base.list_keys(release_key("child", LEASE_DIR)) == []
    assert read_manifest(base, "child").files["index.faiss"]["bytes"] > 4


def test_a_heartbeat_keeps_a_long_publication_live(bucket, monkeypatch):
    monkeypatch.setattr(lease_module, "LEASE_RENEW_S", 0.05)
    monkeypatch.setattr(lease_module, "LEASE_SETTLE_S", 0.0)
    publication = Publication(bucket, "slow")
    publication.acquire()
    try:
        first = leases(bucket, "slow")[0].heartbeat
        lease_module.time.sleep(0.5)
        assert leases(bucket, "slow")[0].heartbeat > first
    finally:
        publication.release()


def test_files_deleted_while_publishing_fail_the_publication(base, document, tmp_path, embedder):
    def delete_a_file(done, total):
        base.remove_keys([release_key("child", "model/config.json")])

    with pytest.raises(ReleaseError, match=r"files of release 'child' were deleted .*\(model/config.json\)"):
        add(base, document, "child", tmp_path, embedder, on_encoded=delete_a_file)
    assert base.list_keys(release_key("child", "")) == []


def test_a_parent_deleted_while_its_child_is_prepared_fails_the_child(base, document, tmp_path, embedder):
    """Deleting the parent removes the memories only it lists, which the child lists too. Once the
    child holds its lease a deletion waits for it; one that began before (while the child read its
    parent and loaded the model) is caught before the child's manifest is written."""
    def unpublish_the_parent(done, total):  # a deletion that began earlier
        base.remove_keys([release_key("base", "manifest.json")])  # its first step

    with pytest.raises(ReleaseError, match="'base', which 'child' is made from, was deleted"):
        add(base, document, "child", tmp_path, embedder, on_encoded=unpublish_the_parent)
    assert base.list_keys(release_key("child", "")) == []


def test_a_parent_published_anew_while_its_child_is_prepared_fails_the_child(base, document, tmp_path, embedder):
    """Deleted and published again under its name (other references, another bank) while the child was
    prepared from it: the parent existed when the child checked, and the child listed memories the
    deletion had removed."""
    def republish_the_parent(done, total):  # a deletion and a publication that began earlier
        key = release_key("base", "manifest.json")
        manifest = json.loads(base.get_bytes(key))
        base.put_bytes(key, json.dumps({**manifest, "created": "2999-01-01T00:00:00+00:00"}).encode())

    with pytest.raises(ReleaseError, match="'base', which 'child' is made from, was deleted and published anew"):
        add(base, document, "child", tmp_path, embedder, on_encoded=republish_the_parent)
    assert base.list_keys(release_key("child", "")) == []


def test_an_unreadable_or_expired_maintenance_lease_holds_no_publication_and_goes(bucket, monkeypatch):
    """An unreadable maintenance lease counted as renewed at every look: every publication of the
    bucket waited for it for ever, and expired ones were never removed."""
    from memory3.services.release.lease import MAINTENANCE_PREFIX, Maintenance, maintenance_leases

    monkeypatch.setattr(lease_module, "LEASE_SETTLE_S", 0.0)
    bucket.put_bytes(f"{MAINTENANCE_PREFIX}garbage.json", b"")
    dead = MaintenanceLease("release gc", "dead", "another host pid 7", "2020-01-01T00:00:00+00:00",
                            "2020-01-01T00:00:00+00:00")
    bucket.put_bytes(dead.key, dead.to_json())
    publication = Publication(bucket, "free")
    publication.acquire()  # returns: nothing live holds it
    publication.release()
    with Maintenance(bucket, "release gc") as held:
        assert [lease.key for lease in maintenance_leases(bucket)] == [held.lease.key]
    assert bucket.list_keys(MAINTENANCE_PREFIX) == []


def test_a_stalled_publisher_leaves_the_release_that_took_its_name_over(base, document, tmp_path, embedder,
                                                                       monkeypatch):
    """A publisher stopped past its lease's expiry, whose name another publisher took over and
    published meanwhile, wrote its files over the other's on waking, and its failure then removed
    everything under the name: the other's published release with it."""
    other = tmp_path / "other.txt"
    other.write_text("Bryn Hollis rows the post out to the Gull Islands twice a week.\n")

    def stopped_then_taken_over(done, total):
        monkeypatch.setattr(lease_module, "datetime", clock_jumped(LEASE_TTL_S + 5))
        add(base, other, "child", tmp_path, embedder)  # its lease expired: another takes the name and publishes

    with pytest.raises(ReleaseError) as failed:
        add(base, document, "child", tmp_path, embedder, on_encoded=stopped_then_taken_over)
    texts = texts_of(base, "child", tmp_path)
    assert other.read_text().strip() in texts and document.read_text().strip() not in texts
    assert "the lease of the publication of release 'child' lapsed" in str(failed.value)


def test_a_late_heartbeat_does_not_bring_back_a_lapsed_lease(bucket, monkeypatch):
    """The heartbeat of a process stopped past its lease's expiry wrote the lease back, though
    another publisher had seen it expire and removed it: two publishers then held the name."""
    monkeypatch.setattr(lease_module, "LEASE_SETTLE_S", 0.0)
    monkeypatch.setattr(lease_module, "LEASE_RENEW_S", 0.05)
    publication = Publication(bucket, "name")
    publication.acquire()
    try:
        monkeypatch.setattr(lease_module, "datetime", clock_jumped(LEASE_TTL_S + 5))
        bucket.remove_keys([publication.lease.key])  # by the publisher that took the name over
        lease_module.time.sleep(0.5)  # heartbeats are due
        assert not bucket.exists(publication.lease.key) and not publication.holds()
        with pytest.raises(ReleaseError, match="lapsed: no heartbeat was written for 180 s"):
            publication.check_held()
    finally:
        publication.release()


def test_a_release_published_just_before_the_lease_is_taken_is_not_removed_as_leftovers(base, document, tmp_path,
                                                                                        embedder, monkeypatch):
    """A publisher that found the name free, then took its lease just after another publisher of
    the name had finished, removed that release as a failed publication's leftovers and published
    over it."""
    other = tmp_path / "other.txt"
    other.write_text("Bryn Hollis rows the post out to the Gull Islands twice a week.\n")
    acquire = Publication.acquire

    def another_finishes_first(self):
        monkeypatch.setattr(Publication, "acquire", acquire)
        add(base, other, "child", tmp_path, embedder)
        acquire(self)

    monkeypatch.setattr(Publication, "acquire", another_finishes_first)
    with pytest.raises(ReleaseExists, match="'child' was published by another process while this one was starting"):
        add(base, document, "child", tmp_path, embedder)
    assert other.read_text().strip() in texts_of(base, "child", tmp_path)
    assert leases(base, "child") == []


@pytest.mark.parametrize("lease", [b'{"holder": "a host pid 1", "started": "2025-', b"[]",
                                   json.dumps({"holder": "h", "started": "now", "heartbeat": "now"}).encode(),
                                   json.dumps({"holder": "h", "started": "2025-01-01T00:00:00",
                                               "heartbeat": "2025-01-01T00:00:00"}).encode()],
                         ids=["truncated", "not-an-object", "not-a-time", "no-time-zone"])
def test_an_unreadable_publication_lease_holds_nothing(bucket, lease):
    """One was counted as renewed at every look: it held its name, every deletion and `release gc`
    for ever, while the message said it would expire."""
    bucket.put_bytes(release_key("junk", f"{LEASE_DIR}0123.json"), lease)
    assert live_leases(bucket, "junk") == []
    with pytest.raises(ReleaseBusy, match="junk have no manifest and no publication running: left half-written"):
        plan_collection(bucket)
    with Maintenance(bucket, "release delete junk") as held:
        assert delete_release(bucket, plan_deletion(bucket, "junk"), held) == 1
    assert plan_collection(bucket).count == 0


def test_gc_says_when_the_lease_of_a_stopped_publisher_expires(base):
    """It said to wait until the release was published, which a killed publisher never does."""
    lease_of(base, "child", "stopped", age_s=60.0)
    with pytest.raises(ReleaseBusy, match=r"child are being published .* nothing was removed: wait until they are "
                                          r"published\. A publisher that was stopped never finishes: its lease "
                                          r"expires 180 s after its last heartbeat, and this can be run again then "
                                          r"\(child: by another host pid 7, .*; its lease expires in 1[12]\d s "):
        plan_collection(base)
