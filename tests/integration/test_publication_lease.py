"""Publication leases on a real S3 server: one publisher per release name, and no deletion of what a
running publication writes or is made from."""

from datetime import UTC, datetime, timedelta

import pytest
from release_fixtures import build_random_release

from memory3.services.release import lease as lease_module
from memory3.services.release.catalog import ReleaseBusy, plan_deletion
from memory3.services.release.lease import LEASE_DIR, LEASE_TTL_S, Lease, MaintenanceLease, Publication, leases
from memory3.services.release.manifest import ReleaseError, release_key
from memory3.services.release.reader import read_manifest
from memory3.services.trainer.releases import kb_add

pytestmark = pytest.mark.integration


@pytest.fixture
def base(bucket, embedder):
    build_random_release(bucket, "base", embedder=embedder)
    return bucket


@pytest.fixture
def document(tmp_path):
    path = tmp_path / "added.txt"
    path.write_text("Orla Venn tunes bells in the tower of Carrow Ness every spring.\n")
    return path


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
