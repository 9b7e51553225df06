"""Listing and deleting releases on a real S3 server: shared banks keep what other releases list."""

import dataclasses
import json
import os

import pytest
from release_fixtures import DOCUMENTS, build_random_release

from memory3.services.cli.main import main
from memory3.services.release.catalog import ReleaseBusy, delete_release, plan_deletion, read_catalog
from memory3.services.release.manifest import MEMORIES_PREFIX, ReleaseNotFound, release_key
from memory3.services.release.reader import Release
from memory3.services.retrieval.embedder import Embedder
from memory3.services.stack import StackProcess, StackState, state_path
from memory3.services.trainer.releases import kb_add

pytestmark = pytest.mark.integration


def memory_keys(store, name):
    rows = [json.loads(line) for line in store.get_bytes(release_key(name, "references.jsonl")).decode().splitlines()]
    return {row["memory_key"] for row in rows}


def test_deleting_releases_removes_what_only_they_list_and_refuses_while_a_bank_reader_is_unknown(bucket, tmp_path):
    embedder = Embedder()
    build_random_release(bucket, "base", embedder=embedder)
    added = tmp_path / "added.txt"
    added.write_text("Wenna Croft builds harps from pear wood in Skarn Point.\n\n"
                     "The Skarn Point harp fair sells forty harps each summer.\n")
    kb_add(bucket, "base", [added], "derived", tmp_path / "cache", embedder=embedder, progress=False)
    build_random_release(bucket, "other", documents=DOCUMENTS[:4], seed=1, embedder=embedder)  # other weights
    catalog = read_catalog(bucket)
    assert {m.name for m in catalog.published} == {"base", "derived", "other"}
    assert not catalog.unpublished and not catalog.unreadable
    base_bank = catalog.published[0].memory_bank["bank"]
    assert {m.memory_bank["bank"] for m in catalog.published if m.name != "other"} == {base_bank}
    base_keys, derived_keys, other_keys = (memory_keys(bucket, n) for n in ("base", "derived", "other"))
    assert len(base_keys) == len(DOCUMENTS) and base_keys < derived_keys and len(derived_keys - base_keys) == 2

    # The parent lists nothing that the derived release does not: nothing of the bank would go.
    plan = plan_deletion(bucket, "base")
    assert plan.memory_keys == [] and plan.kept == len(base_keys) and not plan.whole_bank
    assert plan.sharing == ["derived"] and plan.derived == ["derived"]

    plan = plan_deletion(bucket, "derived")
    assert set(plan.memory_keys) == derived_keys - base_keys and plan.kept == len(base_keys)
    delete_release(bucket, plan)
    assert bucket.list_keys(release_key("derived", "")) == []
    assert not any(bucket.exists(key) for key in derived_keys - base_keys)
    base = Release.open(bucket, "base", tmp_path / "cache2")
    assert len(base.fetch_memories(list(base.by_id))) == len(base_keys)  # every memory of base is intact

    # A release without a manifest may come to list any memory: no deletion until it is gone.
    bucket.put_bytes(release_key("half", "model/config.json"), b"{}")
    bucket.put_bytes(f"{MEMORIES_PREFIX}{base_bank}/zz/orphan", b"left by a failed publication")
    with pytest.raises(ReleaseBusy, match="half.*nothing was deleted"):
        plan_deletion(bucket, "base")
    assert bucket.exists(release_key("base", "manifest.json"))
    plan = plan_deletion(bucket, "half")
    assert not plan.published and plan.bank is None
    assert delete_release(bucket, plan) == 1 and bucket.list_keys(release_key("half", "")) == []

    # The last release of a bank takes the whole bank with it, leftovers included; other banks stay.
    plan = plan_deletion(bucket, "base")
    assert plan.whole_bank and plan.memory_keys == []
    delete_release(bucket, plan)
    assert bucket.list_keys(f"{MEMORIES_PREFIX}{base_bank}/") == []
    assert bucket.list_keys(release_key("base", "")) == []
    assert all(bucket.exists(key) for key in other_keys)
    with pytest.raises(ReleaseNotFound, match=r"not in bucket .*releases there: other\)"):
        plan_deletion(bucket, "base")

    # A manifest this build cannot read: its own objects can go, nothing else until then.
    bucket.put_bytes(release_key("broken", "manifest.json"), b"{not json")
    assert list(read_catalog(bucket).unreadable) == ["broken"]
    with pytest.raises(ReleaseBusy, match="broken cannot be read"):
        plan_deletion(bucket, "other")
    plan = plan_deletion(bucket, "broken")
    assert plan.unreadable and "not valid JSON" in plan.summary()
    delete_release(bucket, plan)
    assert [m.name for m in read_catalog(bucket).published] == ["other"] and not read_catalog(bucket).unreadable


def test_release_commands_list_and_delete_and_leave_what_the_local_stack_serves(bucket, tmp_path, monkeypatch,
                                                                                  capsys):
    build_random_release(bucket, "served")
    build_random_release(bucket, "spare", documents=DOCUMENTS[:3], seed=2)
    config = bucket.config
    home = tmp_path / "home"
    # A stack that `memory3 up` runs on this machine (its one process: this test's), serving "served".
    StackState(str(home), "served", dataclasses.asdict(config), None,
               [StackProcess("s3", os.getpid(), 1, "log")]).save(state_path(home))
    stack = ["--home", str(home), "--s3-bucket", config.bucket]
    monkeypatch.delenv("MEMORY3_S3_ENDPOINT", raising=False)

    assert main(["release", "list", "--json", *stack]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in rows} == {"served", "spare"} and all(r["published"] for r in rows)
    assert {r["name"]: r["memories"] for r in rows} == {"served": len(DOCUMENTS), "spare": 3}

    assert main(["release", "delete", "served", *stack]) == 2
    assert "the local stack serves release 'served'" in capsys.readouterr().err
    assert main(["release", "delete", "spare", "--dry-run", *stack]) == 0
    assert "removed whole" in capsys.readouterr().out and bucket.exists(release_key("spare", "manifest.json"))

    copies = [home / "releases" / "spare", *(home / "releases" / s / "spare" for s in ("text", "memory", "decoder"))]
    for copy in copies:  # this command's local copy, and the local stack's services'
        copy.mkdir(parents=True)
    (home / "releases" / "decoder" / "served").mkdir()
    assert main(["release", "delete", "spare", *stack]) == 0
    out = capsys.readouterr().out
    assert "deleted 'spare'" in out and not any(copy.exists() for copy in copies)
    assert (home / "releases" / "decoder" / "served").exists()
    assert main(["release", "list", *stack]) == 0
    listing = capsys.readouterr().out
    assert "served" in listing and "spare" not in listing
