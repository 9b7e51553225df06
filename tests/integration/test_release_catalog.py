"""Listing and deleting releases on a real S3 server: shared banks keep what other releases list."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
from release_fixtures import DOCUMENTS, build_random_release

from memory3.services.cli.main import main
from memory3.services.release.catalog import Maintenance, ReleaseBusy, delete_release, plan_deletion, read_catalog
from memory3.services.release.manifest import MEMORIES_PREFIX, ReleaseNotFound, release_key
from memory3.services.release.reader import Release
from memory3.services.retrieval.embedder import Embedder
from memory3.services.stack import StackProcess, StackState, state_path
from memory3.services.trainer.releases import kb_add

pytestmark = pytest.mark.integration


def memory_keys(store, name):
    rows = [json.loads(line) for line in store.get_bytes(release_key(name, "references.jsonl")).decode().splitlines()]
    return {row["memory_key"] for row in rows}


@pytest.fixture
def hold(bucket):
    """Takes the maintenance lease a removal is made under, until the test ends (no publication
    may begin after: it would wait)."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(Maintenance(bucket, "release delete (test)"))


def publish_base_derived_and_other(bucket, embedder, tmp_path) -> None:
    """"base"; "derived", base with two references added (one memory bank); "other", of other weights."""
    build_random_release(bucket, "base", embedder=embedder)
    added = tmp_path / "added.txt"
    added.write_text("Wenna Croft builds harps from pear wood in Skarn Point.\n\n"
                     "The Skarn Point harp fair sells forty harps each summer.\n")
    kb_add(bucket, "base", [added], "derived", tmp_path / "cache", embedder=embedder, progress=False)
    build_random_release(bucket, "other", documents=DOCUMENTS[:4], seed=1, embedder=embedder)  # other weights


def test_deleting_releases_removes_what_only_they_list_and_refuses_while_a_bank_reader_is_unknown(bucket, tmp_path,
                                                                                                   hold):
    embedder = Embedder()
    publish_base_derived_and_other(bucket, embedder, tmp_path)
    catalog = read_catalog(bucket)
    assert {m.name for m in catalog.published} == {"base", "derived", "other"}
    assert not catalog.unpublished and not catalog.unreadable
    base_bank = catalog.published[0].memory_bank["bank"]
    assert {m.memory_bank["bank"] for m in catalog.published if m.name != "other"} == {base_bank}
    base_keys, derived_keys, other_keys = (memory_keys(bucket, n) for n in ("base", "derived", "other"))
    assert len(base_keys) == len(DOCUMENTS) and base_keys < derived_keys and len(derived_keys - base_keys) == 2
    held = hold()

    # The parent lists nothing that the derived release does not: nothing of the bank would go.
    plan = plan_deletion(bucket, "base")
    assert plan.memory_keys == [] and plan.kept == len(base_keys) and not plan.whole_bank
    assert plan.listed_by == ["derived"] and plan.derived == ["derived"]

    plan = plan_deletion(bucket, "derived")
    assert set(plan.memory_keys) == derived_keys - base_keys and plan.kept == len(base_keys)
    delete_release(bucket, plan, held)
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
    assert delete_release(bucket, plan, held) == 1 and bucket.list_keys(release_key("half", "")) == []

    # The last release of a bank takes the whole bank with it, leftovers included; other banks stay.
    plan = plan_deletion(bucket, "base")
    assert plan.whole_bank and plan.memory_keys == []
    delete_release(bucket, plan, held)
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
    delete_release(bucket, plan, held)
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


def _cli_store(bucket, monkeypatch, tmp_path) -> list[str]:
    config = bucket.config
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", config.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", config.secret_key)
    return ["--s3-endpoint", config.endpoint, "--s3-bucket", config.bucket, "--cache-dir", str(tmp_path / "cli")]


def test_a_manifest_of_another_shape_is_unreadable_and_can_be_deleted(bucket, tmp_path, monkeypatch, capsys):
    """JSON that is not a manifest (a list, empty sections) failed list, show and every delete with a traceback."""
    build_random_release(bucket, "good")
    good = json.loads(bucket.get_bytes(release_key("good", "manifest.json")))
    bucket.put_bytes(release_key("t-list", "manifest.json"), b"[1, 2]")
    bucket.put_bytes(release_key("t-empty", "manifest.json"),
                     json.dumps({**good, "name": "t-empty", "memory_bank": {}, "index": {}}).encode())
    bucket.put_bytes(release_key("t-count", "manifest.json"),
                     json.dumps({**good, "name": "t-count", "index": {**good["index"], "count": "12"}}).encode())
    store = _cli_store(bucket, monkeypatch, tmp_path)
    assert main(["release", "list", *store]) == 0
    out = capsys.readouterr().out
    for name, why in (("t-list", "manifest is a JSON list, not an object"),
                      ("t-empty", "manifest field memory_bank.bank is missing"),
                      ("t-count", "manifest field index.count is '12', not a JSON integer")):
        assert f"{name:<24} (manifest unreadable: {why})" in out
    assert main(["release", "show", "t-empty", *store]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memory3 release: error: the manifest of release 't-empty' cannot be read (manifest field")
    assert len(err.splitlines()) == 1
    assert main(["release", "delete", "good", "--dry-run", *store]) == 2  # which memories they list is unknown
    assert "t-count, t-empty, t-list cannot be read" in capsys.readouterr().err
    for name in ("t-list", "t-empty", "t-count"):
        assert main(["release", "delete", name, *store]) == 0
        assert "whose manifest cannot be read" in capsys.readouterr().out
    assert [m.name for m in read_catalog(bucket).published] == ["good"] and not read_catalog(bucket).unreadable


def test_a_sigterm_while_kb_add_publishes_removes_what_it_had_written(bucket, tmp_path):
    """Killed where it was, it left a release without a manifest, which stopped every deletion."""
    build_random_release(bucket, "base")
    corpus = tmp_path / "many.txt"
    corpus.write_text("\n\n".join(f"Farmer {i} keeps {i % 7 + 2} goats on the hill of Brask number {i}."
                                  for i in range(400)) + "\n", encoding="utf-8")
    config = bucket.config
    env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": config.access_key, "MEMORY3_S3_SECRET_KEY": config.secret_key}
    add = subprocess.Popen([sys.executable, "-m", "memory3.services.cli.main", "kb", "add", str(corpus),
                            "--release", "base", "--name", "t-term", "--events", "--s3-endpoint", config.endpoint,
                            "--s3-bucket", config.bucket, "--cache-dir", str(tmp_path / "cache")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    def publishing() -> None:
        for line in add.stdout:  # the model's files are uploaded, and the first memories
            if "encoding memories" in line:
                break
        assert bucket.list_keys(release_key("t-term", ""))

    code, err = terminated(add, once=publishing, timeout=120)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == ("memory3 kb: interrupted (SIGTERM); any release it had not finished publishing "
                                    "is removed; run it again")
    assert bucket.list_keys(release_key("t-term", "")) == []
    assert [m.name for m in read_catalog(bucket).published] == ["base"] and not read_catalog(bucket).unpublished


def test_gc_removes_the_memories_no_release_lists_and_waits_for_publications(bucket, embedder, tmp_path, capsys,
                                                                             monkeypatch):
    """Failed or cancelled publications leave memories no release lists: a bank of weights never
    published, or blobs of references never published beside listed ones."""
    from memory3.services.release.catalog import collect_unlisted, plan_collection
    from memory3.services.release.lease import Publication, maintenance_leases

    build_random_release(bucket, "base", embedder=embedder)
    bank = read_catalog(bucket).published[0].memory_bank["bank"]
    listed = memory_keys(bucket, "base")
    stray, orphan_bank = f"{MEMORIES_PREFIX}{bank}/zz/stray", f"{MEMORIES_PREFIX}0123abcd/aa/x"
    for key in (stray, orphan_bank, f"{MEMORIES_PREFIX}0123abcd/bb/y"):
        bucket.put_bytes(key, b"left by a cancelled publication")

    early = plan_collection(bucket)  # as `--dry-run` does: no lease
    assert early.banks == {"0123abcd": 2} and early.keys == {bank: [stray]} and early.count == 3

    running = Publication(bucket, "pending")
    running.acquire()
    try:  # a running publication may be writing memories no release lists yet
        with Maintenance(bucket, "release gc"), \
                pytest.raises(ReleaseBusy, match="pending are being published.*nothing was removed"):
            plan_collection(bucket)
    finally:
        running.release()
    assert maintenance_leases(bucket) == []

    with Maintenance(bucket, "release gc") as held:
        with pytest.raises(RuntimeError, match="taken before the plan was made"):
            collect_unlisted(bucket, early, held)  # a publication may have begun since, unseen
        assert collect_unlisted(bucket, plan_collection(bucket), held) == 3
    assert not bucket.exists(stray) and bucket.list_keys(f"{MEMORIES_PREFIX}0123abcd/") == []
    assert all(bucket.exists(key) for key in listed)
    assert plan_collection(bucket).count == 0

    config = bucket.config
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", config.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", config.secret_key)
    assert main(["release", "gc", "--dry-run", "--s3-endpoint", config.endpoint, "--s3-bucket", config.bucket,
                 "--cache-dir", str(tmp_path)]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_a_publication_waits_while_memories_are_removed(bucket, embedder, tmp_path, monkeypatch):
    """A retried publication uploads the keys a failed one left (content hashes), which `release gc`
    plans to remove as no release lists them. Had it gone on, gc would remove them after its upload
    and the release would list memories that are gone; it waits for gc to finish instead."""
    from memory3.services.release import lease as lease_module
    from memory3.services.release.catalog import collect_unlisted, plan_collection

    monkeypatch.setattr(lease_module, "MAINTENANCE_POLL_S", 0.05)
    build_random_release(bucket, "base", embedder=embedder)
    added = tmp_path / "added.txt"
    added.write_text("Ilse Marrow keeps the lighthouse of Fenwick Reach.\n")

    def fail(done, total):
        raise RuntimeError("cancelled")
    with pytest.raises(RuntimeError, match="cancelled"):
        kb_add(bucket, "base", [added], "child", tmp_path / "cache", embedder=embedder, progress=False,
               on_encoded=fail)
    with Maintenance(bucket, "release gc") as held:
        plan = plan_collection(bucket)
        stray = [key for keys in plan.keys.values() for key in keys]
        assert len(stray) == 1  # the memory of the added text, uploaded before the failure

        waiting, encoded = threading.Event(), threading.Event()
        seen = lease_module.live_maintenance
        monkeypatch.setattr(lease_module, "live_maintenance", lambda store: (waiting.set(), seen(store))[1])
        retry = threading.Thread(target=kb_add, args=(bucket, "base", [added], "child", tmp_path / "cache"),
                                 kwargs={"embedder": embedder, "progress": False,
                                         "on_encoded": lambda done, total: encoded.set()})
        retry.start()
        assert waiting.wait(60)
        assert not encoded.wait(3.0), "the retry encoded and uploaded while gc held its lease"
        assert collect_unlisted(bucket, plan, held) == 1
    retry.join(120)
    assert not retry.is_alive() and encoded.is_set()
    child = Release.open(bucket, "child", tmp_path / "cache2")
    assert len(child.fetch_memories(list(child.by_id))) == len(child.by_id)  # every memory it lists is there


def without_memory_ids(bucket, name) -> None:
    """Release `name` as one published before `memory_ids.npy` was: its reference table alone lists its memories."""
    from memory3.services.release.manifest import MANIFEST_FILE, Manifest
    from memory3.services.release.memory_ids import MEMORY_IDS_FILE

    manifest = Manifest.from_json(bucket.get_bytes(release_key(name, MANIFEST_FILE)).decode())
    del manifest.files[MEMORY_IDS_FILE]
    bucket.put_bytes(release_key(name, MANIFEST_FILE), manifest.to_json().encode())
    bucket.remove_keys([release_key(name, MEMORY_IDS_FILE)])


def cut_and_removed(bucket, name, files) -> Callable[[], None]:
    """Cuts each of `files` of release `name` at its last byte (a table cut at a row's end parses);
    gives back a function that removes them."""
    for file in files:
        listing = bucket.get_bytes(release_key(name, file))
        bucket.put_bytes(release_key(name, file), listing[:-1])

    def remove() -> None:
        bucket.remove_keys([release_key(name, file) for file in files])

    return remove


def why_unreadable(files, what: str) -> str:
    return ", and ".join(f"{file} {what}" for file in files)


@pytest.mark.parametrize("files", [("references.jsonl",), ("memory_ids.npy", "references.jsonl")])
def test_a_release_whose_listing_is_missing_can_be_deleted_and_stops_no_gc(bucket, embedder, tmp_path, hold, files):
    """A published release without its references.jsonl could not be deleted, and every deletion
    in its bank and every `release gc` failed on it. Its memories are listed by its `memory_ids.npy`,
    or by its table where it has none or that file cannot be read: unknown when neither can."""
    from memory3.services.release.catalog import collect_unlisted, plan_collection

    publish_base_derived_and_other(bucket, embedder, tmp_path)
    if "memory_ids.npy" not in files:
        for name in ("base", "derived", "other"):
            without_memory_ids(bucket, name)
    banks = {m.name: m.memory_bank["bank"] for m in read_catalog(bucket).published}
    only_derived = memory_keys(bucket, "derived") - memory_keys(bucket, "base")
    strays = {name: f"{MEMORIES_PREFIX}{banks[name]}/zz/stray" for name in ("base", "other")}
    for key in strays.values():
        bucket.put_bytes(key, b"left by a cancelled publication")
    plan = plan_collection(bucket)  # read from either file, the listings are the same
    assert plan.keys == {banks["base"]: [strays["base"]], banks["other"]: [strays["other"]]} and not plan.skipped
    remove = cut_and_removed(bucket, "derived", files)
    plan = plan_collection(bucket)  # a listing that is not the manifest's lists too few memories
    assert plan.skipped == {banks["base"]: {"derived": why_unreadable(files, "does not match the manifest's checksum")}}
    assert banks["base"] not in plan.keys
    remove()
    held = hold()
    missing = why_unreadable(files, "is missing")

    plan = plan_collection(bucket)  # the bank of "derived" is left whole; the others are collected
    assert plan.keys == {banks["other"]: [strays["other"]]} and list(plan.skipped) == [banks["base"]]
    assert (f"memory bank {banks['base']}: left whole, as the reference tables of derived cannot be read (derived: "
            f"{missing})") in plan.summary()

    plan = plan_deletion(bucket, "base")  # which of its memories "derived" lists is unknown: all stay
    assert plan.memory_keys == [] and plan.kept == len(DOCUMENTS)
    assert plan.unknown_tables == {"derived": missing}

    plan = plan_deletion(bucket, "derived")
    assert plan.memory_keys == [] and plan.table_unreadable == missing
    assert f"its reference table cannot be read ({missing})" in plan.summary()
    delete_release(bucket, plan, held)
    assert bucket.list_keys(release_key("derived", "")) == [] and all(bucket.exists(k) for k in only_derived)

    plan = plan_collection(bucket)  # its memories are now those no release lists
    assert set(plan.keys[banks["base"]]) == only_derived | {strays["base"]} and not plan.skipped
    collect_unlisted(bucket, plan, held)
    base = Release.open(bucket, "base", tmp_path / "cache2")
    assert len(base.fetch_memories(list(base.by_id))) == len(DOCUMENTS)


def test_a_release_whose_memory_ids_are_lost_is_listed_by_its_table(bucket, embedder, tmp_path, hold, caplog):
    """A release whose `memory_ids.npy` was damaged or missing, with its reference table intact, was
    taken for one whose memories no one knows: `release gc` left its bank whole, and no deletion in
    that bank removed any memory. The table lists the same memories, with a warning that says so."""
    from memory3.services.release.catalog import collect_unlisted, plan_collection

    publish_base_derived_and_other(bucket, embedder, tmp_path)
    banks = {m.name: m.memory_bank["bank"] for m in read_catalog(bucket).published}
    only_derived = memory_keys(bucket, "derived") - memory_keys(bucket, "base")
    stray = f"{MEMORIES_PREFIX}{banks['base']}/zz/stray"
    bucket.put_bytes(stray, b"left by a cancelled publication")
    remove = cut_and_removed(bucket, "derived", ["memory_ids.npy"])
    with caplog.at_level("WARNING", logger="memory3.release"):
        plan = plan_collection(bucket)
    assert plan.keys == {banks["base"]: [stray]} and not plan.skipped
    assert ("release 'derived': memory_ids.npy does not match the manifest's checksum; what it lists is read from "
            "references.jsonl instead") in caplog.messages
    remove()
    held = hold()

    plan = plan_deletion(bucket, "base")  # "derived" lists every memory of base
    assert plan.memory_keys == [] and plan.kept == len(DOCUMENTS) and not plan.unknown_tables
    assert plan.listed_by == ["derived"]

    plan = plan_deletion(bucket, "derived")
    assert set(plan.memory_keys) == only_derived and plan.table_unreadable is None
    delete_release(bucket, plan, held)
    assert not any(bucket.exists(key) for key in only_derived)
    assert "release 'derived': memory_ids.npy is missing; what it lists is read from references.jsonl instead" in (
        caplog.messages)

    plan = plan_collection(bucket)
    assert plan.keys == {banks["base"]: [stray]} and not plan.skipped
    collect_unlisted(bucket, plan, held)
    base = Release.open(bucket, "base", tmp_path / "cache2")
    assert len(base.fetch_memories(list(base.by_id))) == len(DOCUMENTS)


def test_a_deletion_names_the_releases_that_list_the_memories_it_keeps(bucket, embedder):
    """It named every release of the bank as listing them, those that list none of them too."""
    build_random_release(bucket, "base", embedder=embedder)
    build_random_release(bucket, "first", documents=DOCUMENTS[:3], embedder=embedder)  # the same weights: one bank
    build_random_release(bucket, "last", documents=DOCUMENTS[6:], embedder=embedder)
    plan = plan_deletion(bucket, "last")
    assert plan.summary().endswith("0 memories only this release lists; 6 kept, listed by base too")
    assert plan.listed_by == ["base"]


def test_a_sigterm_while_release_gc_runs_removes_its_maintenance_lease(bucket, tmp_path):
    """Killed where it was, it left its lease, which every publication in the bucket waited for
    until it expired."""
    from memory3.services.release.lease import maintenance_leases

    config = bucket.config
    env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": config.access_key, "MEMORY3_S3_SECRET_KEY": config.secret_key}
    planning_for_long = ("import sys, time\n"
                         "from memory3.services.release import catalog\n"
                         "def read_catalog(store):\n"
                         "    print('planning', flush=True)\n"
                         "    time.sleep(120)\n"
                         "catalog.read_catalog = read_catalog\n"
                         "from memory3.services.cli.main import main\n"
                         "sys.exit(main(sys.argv[1:]))\n")
    gc = subprocess.Popen([sys.executable, "-c", planning_for_long, "release", "gc", "--s3-endpoint",
                           config.endpoint, "--s3-bucket", config.bucket, "--cache-dir", str(tmp_path / "cache")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    def planning() -> None:
        assert gc.stdout.readline() == "planning\n"
        assert len(maintenance_leases(bucket)) == 1

    code, err = terminated(gc, once=planning, timeout=60)
    assert code == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1] == ("memory3 release: interrupted (SIGTERM); the memories it had not removed yet are "
                                    "still in the bucket: run it again")
    assert maintenance_leases(bucket) == []


def terminated(process: subprocess.Popen, *, once: Callable[[], None], timeout: float) -> tuple[int, str]:
    """SIGTERM to `process` once `once()` returns (it reads the process's output to see it at work);
    then its exit status and what it wrote to stderr."""
    try:
        once()
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=timeout), process.stderr.read()
    finally:
        process.kill()
        process.stdout.close()
        process.stderr.close()


def test_a_release_copied_under_another_name_keeps_its_memories_when_the_original_is_deleted(bucket, embedder,
                                                                                            tmp_path, hold):
    """A release copied to a new name (its objects copied, as a promotion does) keeps the name of
    the original in its manifest. The catalog took it for a second release of that name: deleting
    the original removed the whole bank, and the copy, still listed, read memories that were gone."""
    build_random_release(bucket, "staging", embedder=embedder)
    for key in bucket.list_keys(release_key("staging", "")):
        bucket.put_bytes(key.replace("releases/staging/", "releases/prod/", 1), bucket.get_bytes(key))
    assert sorted(m.name for m in read_catalog(bucket).published) == ["prod", "staging"]
    held = hold()
    plan = plan_deletion(bucket, "staging")
    assert not plan.whole_bank and plan.listed_by == ["prod"] and plan.memory_keys == []
    delete_release(bucket, plan, held)
    prod = Release.open(bucket, "prod", tmp_path / "cache")
    assert len(prod.fetch_memories(list(prod.by_id))) == len(DOCUMENTS)


@pytest.mark.parametrize("file", ["absolute", "../../outside/x.txt", "model/../../../outside/x.txt"])
def test_a_manifest_naming_a_file_outside_its_release_is_unreadable(bucket, tmp_path, file):
    """A manifest's file names became paths under the local copy unchecked: an absolute one, or one
    climbing out with '..', made opening the release write outside its cache directory (on AWS S3,
    which takes such keys, any file the service may write)."""
    from memory3.services.release.manifest import ReleaseError

    outside = tmp_path / "cache" / "release" / "outside"
    file = str(outside / "x.txt") if file == "absolute" else file
    build_random_release(bucket, "good")
    for key in bucket.list_keys(release_key("good", "")):
        bucket.put_bytes(key.replace("releases/good/", "releases/evil/", 1), bucket.get_bytes(key))
    manifest = json.loads(bucket.get_bytes(release_key("evil", "manifest.json")))
    manifest["files"][file] = {"sha256": "0" * 64, "bytes": 2}
    bucket.put_bytes(release_key("evil", "manifest.json"), json.dumps(manifest).encode())
    with pytest.raises(ReleaseError, match=r"manifest field files\[.*\] is not a file of the release"):
        Release.open(bucket, "evil", tmp_path / "cache" / "release" / "copies")
    assert not outside.exists()
    assert "is not a file of the release" in read_catalog(bucket).unreadable["evil"]


def test_shards_kept_in_the_store_go_with_the_last_release_of_their_file(bucket, embedder, tmp_path, hold,
                                                                        monkeypatch):
    """The shards of a release's index and reference table (file_shards.py) are kept under each file's
    sha256: deleting a release removes them unless another release has the same file, and `release gc`
    removes those of a file no published release has, and bytes no pointer names."""
    from memory3.services.release import file_shards
    from memory3.services.release.catalog import collect_unlisted, plan_collection
    from memory3.services.release.file_shards import bytes_key, pointer_key, shards_dir
    from memory3.services.release.publish import INDEX_FILE, REFERENCES_FILE
    from memory3.services.retrieval.index import IndexShard
    from memory3.services.text.engine import load_release_resources

    build_random_release(bucket, "staging", embedder=embedder)
    load_release_resources(bucket, "staging", tmp_path / "pod", IndexShard(0, 2))  # keeps shard 0/2 in the store
    files = read_catalog(bucket).published[0].files
    shas = [files[INDEX_FILE]["sha256"], files[REFERENCES_FILE]["sha256"]]
    kept = sorted(key for sha in shas for key in bucket.list_keys(shards_dir(sha)))
    assert kept == sorted(key for sha in shas for key in (
        bytes_key(sha, IndexShard(0, 2), json.loads(bucket.get_bytes(pointer_key(sha, IndexShard(0, 2))))["sha256"]),
        pointer_key(sha, IndexShard(0, 2))))
    orphan = pointer_key("0" * 64, IndexShard(1, 2))
    lost = bytes_key(shas[0], IndexShard(0, 2), "f" * 64)  # a writer's that lost the race
    bucket.put_bytes(orphan, b"a shard of a file whose releases are gone")
    bucket.put_bytes(lost, b"bytes no pointer names")
    bucket.put_bytes("shards/v1/notes.txt", b"not ours")

    held = hold()
    assert plan_collection(bucket).shards == {"0" * 64: [orphan]}  # the lost bytes are new: a pointer may come
    monkeypatch.setattr(file_shards, "UNNAMED_GRACE_S", -1.0)
    plan = plan_collection(bucket)
    assert plan.shards == {"0" * 64: [orphan], shas[0]: [lost]} and plan.count == 2
    assert "shards of file 000000000000…: 1 objects go" in plan.summary()
    assert collect_unlisted(bucket, plan, held) == 2
    assert not bucket.exists(orphan) and not bucket.exists(lost) and bucket.exists("shards/v1/notes.txt")
    assert sorted(key for sha in shas for key in bucket.list_keys(shards_dir(sha))) == kept

    for key in bucket.list_keys(release_key("staging", "")):  # a copy has the same files
        bucket.put_bytes(key.replace("releases/staging/", "releases/prod/", 1), bucket.get_bytes(key))
    plan = plan_deletion(bucket, "staging")
    assert plan.shard_keys == []
    delete_release(bucket, plan, held)
    plan = plan_deletion(bucket, "prod")
    assert sorted(plan.shard_keys) == kept
    assert "the shards of its index and reference table kept in the store: 4 objects" in plan.summary()
    delete_release(bucket, plan, held)
    assert not any(bucket.list_keys(shards_dir(sha)) for sha in shas)


def test_a_release_derived_from_a_copy_names_the_copy_as_its_parent(bucket, embedder, tmp_path):
    """A release copied to a new name keeps the original's name in its manifest: releases derived from the
    copy recorded, and checked for, the original, and once it was deleted every derivation failed ("release
    'staging', which ... is made from, was deleted")."""
    from memory3.services.trainer.releases import kb_remove

    build_random_release(bucket, "staging", embedder=embedder)
    for key in bucket.list_keys(release_key("staging", "")):
        bucket.put_bytes(key.replace("releases/staging/", "releases/prod/", 1), bucket.get_bytes(key))
    with Maintenance(bucket, "release delete (test)") as held:
        delete_release(bucket, plan_deletion(bucket, "staging"), held)
    prod = Release.open(bucket, "prod", tmp_path / "cache")
    assert prod.name == "prod"
    fixed = kb_remove(bucket, prod, prod.references[:1], "prod-fixed", progress=False)
    assert fixed.parent == "prod" and fixed.provenance["parent"] == "prod"
    assert Release.open(bucket, "prod-fixed", tmp_path / "cache").manifest.parent == "prod"
