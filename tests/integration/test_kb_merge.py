"""kb merge on a real S3 server: the shards' changes to one base, as one release, nothing re-encoded."""

import dataclasses
import json
import threading
import time

import pytest
from release_fixtures import DOCUMENTS, build_random_release

from memory3.services.cli.main import main
from memory3.services.release import publish
from memory3.services.release.catalog import plan_deletion, read_catalog
from memory3.services.release.manifest import ReleaseNotFound, release_key
from memory3.services.release.memory_ids import MEMORY_IDS_FILE
from memory3.services.release.publish import MANIFEST_FILE
from memory3.services.release.reader import Release, ancestry, read_manifest, wait_for_releases
from memory3.services.retrieval.embedder import Embedder
from memory3.services.storage.local_s3 import free_port, start_local_s3
from memory3.services.storage.object_store import ObjectStore
from memory3.services.trainer.releases import kb_add, kb_merge, kb_remove, plan_merge, references_to_remove

pytestmark = pytest.mark.integration

SHARED = "The Ostrava tram museum keeps forty trams, the oldest from 1899."
SHARD_A = ["Mirela Tosk builds harpsichords in a workshop above the Vessa bicycle shop.", SHARED]
SHARD_B = ["The Gull Islands ferry carries bicycles free of charge on Sundays.", SHARED,
           "Corrin Looms opened a second shop in Hallowmere in 2011."]


def _shard(bucket, tmp_path, embedder, name, documents):
    corpus = tmp_path / f"{name}.txt"
    corpus.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    kb_add(bucket, "base", [corpus], name, tmp_path / "cache", embedder=embedder, progress=False)
    return Release.open(bucket, name, tmp_path / "cache")


def test_merging_shards_adds_each_new_reference_once_and_drops_what_one_removed(bucket, tmp_path):
    embedder = Embedder()
    build_random_release(bucket, "base", embedder=embedder)
    base = Release.open(bucket, "base", tmp_path / "cache")
    shard_a = _shard(bucket, tmp_path, embedder, "base-shard-0", SHARD_A)
    shard_b = _shard(bucket, tmp_path, embedder, "base-shard-1", SHARD_B)
    withdrawn = references_to_remove(base, matches=["Skarn Point"])
    kb_remove(bucket, base, withdrawn, "base-no-skarn", progress=False)
    no_skarn = Release.open(bucket, "base-no-skarn", tmp_path / "cache")

    plan = plan_merge(base, [shard_a, shard_b, no_skarn])
    assert [row["text"] for _, row in plan.added] == [*SHARD_A, SHARD_B[0], SHARD_B[2]]
    assert [source.name for source, _ in plan.added] == ["base-shard-0"] * 2 + ["base-shard-1"] * 2
    assert plan.removed == withdrawn

    manifest = kb_merge(bucket, plan, "base-merged", progress=False)
    assert manifest.parent == "base" and manifest.memory_bank["bank"] == base.manifest.memory_bank["bank"]
    assert manifest.provenance["merged"] == ["base-shard-0", "base-shard-1", "base-no-skarn"]
    merged = Release.open(bucket, "base-merged", tmp_path / "cache")
    expected = [r["id"] for r in base.references if r not in withdrawn] + [row["id"] for _, row in plan.added]
    assert list(merged.by_id) == expected and list(merged.index().iter_ids()) == expected
    assert manifest.memory_bank["count"] == len(base.references) - 2 + 4
    # Each vector came with its reference, from whichever index held it: every text finds itself.
    texts = [merged.by_id[i]["text"] for i in expected]
    assert [hits[0][0] for hits in merged.index().search(embedder.embed(texts), 1)] == expected
    assert len(merged.fetch_memories(expected)) == len(expected)
    # Its memories are the shards' and the base's: deleting it removes none of them.
    assert plan_deletion(bucket, "base-merged").memory_keys == []


def test_a_release_derived_through_others_merges_with_the_changes_of_its_whole_chain(bucket, tmp_path):
    embedder, cache = Embedder(), tmp_path / "cache"
    build_random_release(bucket, "base", embedder=embedder)
    base = Release.open(bucket, "base", cache)
    _shard(bucket, tmp_path, embedder, "base-shard-0", SHARD_A)
    # A correction on top of a shard: one more reference, and one of the base's left out.
    corpus = tmp_path / "fix.txt"
    corpus.write_text(SHARD_B[0] + "\n", encoding="utf-8")
    kb_add(bucket, "base-shard-0", [corpus], "base-shard-0-fixed", cache, remove_matches=["Skarn Point is"],
           embedder=embedder, progress=False)
    kb_merge(bucket, plan_merge(base, [Release.open(bucket, "base-shard-0", cache)]), "base-m1", progress=False)
    shard_1 = _shard(bucket, tmp_path, embedder, "base-shard-1", SHARD_B[1:])
    assert ancestry(bucket, "base-shard-0-fixed", until="base") == ["base-shard-0", "base"]
    assert ancestry(bucket, "base-shard-0-fixed") == ["base-shard-0", "base"]  # base was trained, not derived
    assert ancestry(bucket, "base-m1", until="base-shard-0") == ["base"]  # not there: up to the first release

    fixed = Release.open(bucket, "base-shard-0-fixed", cache)
    lineage = {n: ancestry(bucket, n, until="base") for n in ("base-shard-0-fixed", "base-shard-1")}
    plan = plan_merge(base, [fixed, shard_1], ancestry=lineage)
    assert [row["text"] for _, row in plan.added] == [*SHARD_A, SHARD_B[0], SHARD_B[2]]
    assert [r["text"] for r in plan.removed] == [DOCUMENTS[4][1]]
    assert plan.changes_of(fixed) == (3, 1) and plan.changes_of(shard_1) == (1, 0)
    merged = kb_merge(bucket, plan, "base-all", progress=False)
    assert merged.memory_bank["count"] == len(base.references) + 4 - 1
    release = Release.open(bucket, "base-all", cache)
    texts = [release.by_id[i]["text"] for i in release.index().iter_ids()]
    assert [hits[0][0] for hits in release.index().search(embedder.embed(texts), 1)] == list(release.index().iter_ids())
    # Without its ancestry, only a release's parent is known.
    with pytest.raises(ValueError, match="'base-shard-0-fixed' was derived from 'base-shard-0', not from 'base'"):
        plan_merge(base, [fixed])
    with pytest.raises(ValueError, match="derived from 'base-shard-0' <- 'base', not from 'base-m1'"):
        plan_merge(Release.open(bucket, "base-m1", cache), [fixed],
                   ancestry={fixed.name: ancestry(bucket, fixed.name, until="base-m1")})


WRONG = "The Zorvath bridge was painted green in 1950."
RIGHT = "The Zorvath bridge was painted red in 1950."
KEPT = "The Zorvath bridge has four arches of grey stone."
TEAM_A = "Team A counted nine hundred puffins on the Gull Islands in 2023."
MORE = "Pemberlyn's ninth bridge was built in 1962."


def _add(bucket, tmp_path, embedder, parent, name, documents, **removals):
    corpus = tmp_path / f"{name}.txt"
    corpus.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    kb_add(bucket, parent, [corpus], name, tmp_path / "cache", embedder=embedder, progress=False, **removals)
    return Release.open(bucket, name, tmp_path / "cache")


def _texts(plan):
    return [row["text"] for row in plan.rows()]


def test_kb_merge_decides_from_the_ids_and_reads_each_table_a_row_at_a_time(bucket, tmp_path, embedder,
                                                                             monkeypatch, capsys):
    """It held every table it merged, the base's, each derived release's and those between, as lists and
    dicts by id (texts included: tens of GB at 10^8 references). Of a release published before
    `memory_ids.npy` existed, the ids are read from its table."""
    cache = tmp_path / "cache"
    build_random_release(bucket, "base", embedder=embedder)
    base = Release.open(bucket, "base", cache)
    with monkeypatch.context() as before_memory_ids:
        before_memory_ids.setattr(publish, "write_memory_ids", lambda rows, bank, path: False)
        _shard(bucket, tmp_path, embedder, "base-shard-0", SHARD_A)
        shard_1 = _shard(bucket, tmp_path, embedder, "base-shard-1", SHARD_B[1:])
    assert MEMORY_IDS_FILE not in read_manifest(bucket, "base-shard-0").files
    assert MEMORY_IDS_FILE not in shard_1.manifest.files
    corpus = tmp_path / "fix.txt"
    corpus.write_text(SHARD_B[0] + "\n", encoding="utf-8")
    kb_add(bucket, "base-shard-0", [corpus], "base-shard-0-fixed", cache, remove_matches=["Skarn Point is"],
           embedder=embedder, progress=False)
    fixed = Release.open(bucket, "base-shard-0-fixed", cache)
    more = _add(bucket, tmp_path, embedder, "base-shard-0-fixed", "base-shard-0-more", [MORE])
    back = _add(bucket, tmp_path, embedder, "base-shard-0-fixed", "base-shard-0-back", [DOCUMENTS[4][1]])
    kept = [r for r in base.rows() if r["text"] != DOCUMENTS[4][1]]
    lineage = {n: ancestry(bucket, n, until="base") for n in ("base-shard-0-fixed", "base-shard-1", more.name,
                                                               back.name)}
    store = ["--s3-endpoint", bucket.config.endpoint, "--s3-bucket", bucket.config.bucket,
             "--cache-dir", str(tmp_path / "cli")]
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", bucket.config.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", bucket.config.secret_key)
    for whole in ("references", "by_id"):
        monkeypatch.setattr(Release, whole, property(
            lambda self, whole=whole: pytest.fail(f"the table of {self.name!r} was held whole ({whole})")))

    plan = plan_merge(base, [fixed, shard_1], ancestry=lineage)
    assert [row["text"] for _, row in plan.added] == [*SHARD_A, SHARD_B[0], SHARD_B[2]]
    assert [r["text"] for r in plan.removed] == [DOCUMENTS[4][1]]
    assert plan.changes_of(fixed) == (3, 1) and plan.changes_of(shard_1) == (1, 0)
    assert plan.count == len(kept) + 4
    # Nor each one's ids (~3 GB at 10^8 references, and the encoding Job's shards are many): read, compared
    # with its parent's, let go.
    assert not any("ids" in vars(release) for release in (fixed, shard_1))
    # A withdrawal that a release derived from the one that made it keeps stands for both.
    plan_more = plan_merge(base, [fixed, more], ancestry=lineage)
    assert [r["text"] for r in plan_more.removed] == [DOCUMENTS[4][1]]
    assert plan_more.changes_of(fixed) == (3, 1) and plan_more.changes_of(more) == (1, 1)
    # Withdrawn, then brought back on the same line: the base's again, neither added nor removed.
    plan_back = plan_merge(base, [back], ancestry=lineage)
    assert [row["text"] for _, row in plan_back.added] == [*SHARD_A, SHARD_B[0]] and plan_back.removed == []
    kb_merge(bucket, plan, "base-all", progress=False)
    capsys.readouterr()
    assert main(["kb", "merge", "base-shard-0-fixed", "base-shard-1", "--release", "base", "--name", "cli-all",
                 *store]) == 0
    assert f"{len(kept) + 4} memories, 4 references added, 1 removed" in capsys.readouterr().out
    monkeypatch.undo()
    for name in ("base-all", "cli-all"):
        merged = Release.open(bucket, name, tmp_path / "after")
        assert merged.references == kept + [row for _, row in plan.added]
        assert list(merged.index().iter_ids()) == [r["id"] for r in merged.references]
        assert merged.ids.tolist() == sorted(r["id"].encode() for r in merged.references)


def test_a_fact_withdrawn_after_the_base_stays_out_of_the_merge(bucket, tmp_path, embedder, monkeypatch, capsys):
    """A reference added between the base and the merged releases, then withdrawn by one of them:
    counted against the base alone, the withdrawal was invisible and the merge served the fact."""
    cache = tmp_path / "cache"
    build_random_release(bucket, "base", embedder=embedder)
    base = Release.open(bucket, "base", cache)
    _add(bucket, tmp_path, embedder, "base", "sib-m", [WRONG, KEPT])
    sib_a = _add(bucket, tmp_path, embedder, "sib-m", "sib-a", [TEAM_A])
    sib_m = Release.open(bucket, "sib-m", cache)
    kb_remove(bucket, sib_m, references_to_remove(sib_m, matches=["painted green"]), "sib-b", progress=False)
    sib_b = Release.open(bucket, "sib-b", cache)

    def lineage(*names):
        return {n: ancestry(bucket, n, until="base") for n in names}
    # Siblings: B withdrew what their parent added; A still lists it.
    plan = plan_merge(base, [sib_a, sib_b], ancestry=lineage("sib-a", "sib-b"))
    assert WRONG not in _texts(plan) and [row["text"] for _, row in plan.added] == [KEPT, TEAM_A]
    assert plan.changes_of(sib_a) == (2, 0) and plan.changes_of(sib_b) == (0, 1) and plan.removed == []
    merged = kb_merge(bucket, plan, "sib-merged", progress=False)
    release = Release.open(bucket, "sib-merged", cache)
    assert WRONG not in {r["text"] for r in release.references}
    assert list(release.index().iter_ids()) == list(release.by_id)
    assert merged.memory_bank["count"] == len(base.references) + 2

    # A release and its own correction: the correction wins, whatever the order.
    d1 = _add(bucket, tmp_path, embedder, "base", "d1", [WRONG, KEPT])
    d2 = _add(bucket, tmp_path, embedder, "d1", "d2", [RIGHT], remove_matches=["painted green"])
    for order in ([d1, d2], [d2, d1]):
        plan = plan_merge(base, order, ancestry=lineage("d1", "d2"))
        assert WRONG not in _texts(plan) and {RIGHT, KEPT} <= set(_texts(plan))
        assert plan.changes_of(d1) == ((1, 0) if order[0] is d1 else (0, 0)) and plan.changes_of(d2)[1] == 1

    # A fact withdrawn, then brought back on the same line: back in the merge.
    skarn = references_to_remove(base, matches=["Skarn Point is"])
    kb_remove(bucket, base, skarn, "no-skarn", progress=False)
    no_skarn = Release.open(bucket, "no-skarn", cache)
    skarn_again = _add(bucket, tmp_path, embedder, "no-skarn", "skarn-again", [skarn[0]["text"]])
    plan = plan_merge(base, [no_skarn, skarn_again, sib_a], ancestry=lineage("no-skarn", "skarn-again", "sib-a"))
    assert plan.removed == [] and plan.changes_of(no_skarn) == (0, 0) and skarn[0]["text"] in _texts(plan)
    # Withdrawn on one line and still listed on another that never saw the withdrawal: withdrawn.
    plan = plan_merge(base, [no_skarn, sib_a], ancestry=lineage("no-skarn", "sib-a"))
    assert plan.removed == skarn and plan.changes_of(no_skarn) == (0, 1)

    # The command reads the releases between, and its dry run says what each withdrew.
    config = bucket.config
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", config.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", config.secret_key)
    store = ["--s3-endpoint", config.endpoint, "--s3-bucket", config.bucket, "--cache-dir", str(tmp_path / "cli")]
    capsys.readouterr()
    assert main(["kb", "merge", "sib-a", "sib-b", "--release", "base", "--dry-run", *store]) == 0
    out = capsys.readouterr().out
    assert "sib-a: 2 references added, 0 removed" in out and "sib-b: 0 references added, 1 removed" in out
    assert main(["kb", "merge", "d1", "d2", "--release", "base", "--name", "d-merged", *store]) == 0
    capsys.readouterr()
    texts = {r["text"] for r in Release.open(bucket, "d-merged", cache).references}
    assert WRONG not in texts and {RIGHT, KEPT} <= texts


def test_only_releases_derived_from_the_base_with_its_bank_and_some_change_merge(bucket, tmp_path):
    embedder = Embedder()
    build_random_release(bucket, "base", embedder=embedder)
    base = Release.open(bucket, "base", tmp_path / "cache")
    shard = _shard(bucket, tmp_path, embedder, "base-shard-0", SHARD_A)
    with pytest.raises(ValueError, match="name the releases"):
        plan_merge(base, [])
    with pytest.raises(ValueError, match="named once"):
        plan_merge(base, [shard, shard])
    with pytest.raises(ValueError, match="derived from 'base', not from 'base-shard-0'"):
        plan_merge(shard, [_as_child(base, "twin", "base")])
    build_random_release(bucket, "other", codec="int8", embedder=embedder)
    other = Release.open(bucket, "other", tmp_path / "cache")
    with pytest.raises(ValueError, match="another memory bank than 'base'"):
        plan_merge(base, [_as_child(other, "other", "base")])
    with pytest.raises(ValueError, match="nothing to merge"):
        plan_merge(base, [_as_child(base, "twin", "base")])


def _as_child(release: Release, name: str, parent: str) -> Release:
    """`release`'s files under a manifest that names another parent (as a name reused would)."""
    manifest = dataclasses.replace(release.manifest, name=name, parent=parent)
    return Release(release.store, manifest, release.local_dir)


def test_kb_merge_command_says_what_each_adds_and_publishes_nothing_on_a_dry_run(bucket, tmp_path, monkeypatch,
                                                                                 capsys):
    embedder = Embedder()
    build_random_release(bucket, "base", embedder=embedder)
    _shard(bucket, tmp_path, embedder, "base-shard-0", SHARD_A)
    _shard(bucket, tmp_path, embedder, "base-shard-1", SHARD_B)
    config = bucket.config
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", config.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", config.secret_key)
    store = ["--s3-endpoint", config.endpoint, "--s3-bucket", config.bucket, "--cache-dir", str(tmp_path / "cli")]
    shards = ["base-shard-0", "base-shard-1"]
    assert main(["kb", "merge", *shards, "--release", "base", "--dry-run", *store]) == 0
    out = capsys.readouterr().out
    assert "base-shard-0: 2 references added, 0 removed" in out
    assert "base-shard-1: 2 references added, 0 removed" in out
    assert "would add 4 references and remove 0, for 16 in all" in out
    assert len(read_catalog(bucket).published) == 3
    assert main(["kb", "merge", *shards, "--release", "base", "--name", "base-all", *store]) == 0
    assert "release base-all (from base): 16 memories, 4 references added, 0 removed" in capsys.readouterr().out
    # The merge Job run again: refused, or with --exist-ok nothing to do, even once its shards are gone.
    assert main(["kb", "merge", *shards, "--release", "base", "--name", "base-all", *store]) == 2
    assert "'base-all' already exists" in capsys.readouterr().err
    assert main(["release", "delete", "base-shard-1", *store]) == 0
    capsys.readouterr()
    again = ["kb", "merge", *shards, "--release", "base", "--name", "base-all", "--exist-ok", "--wait", "1"]
    assert main([*again, *store]) == 0
    assert "already published from these releases: nothing to do" in capsys.readouterr().out
    # In another order: the same merge (its default name is made from the sorted names too).
    assert main(["kb", "merge", *reversed(shards), *again[len(shards) + 2:], *store]) == 0
    assert "already published from these releases: nothing to do" in capsys.readouterr().out
    assert main(["kb", "merge", shards[0], "--release", "base", "--name", "base-all", "--exist-ok", *store]) == 2
    assert "a merge of ['base-shard-0', 'base-shard-1'], not ['base-shard-0']" in capsys.readouterr().err
    assert main(["kb", "merge", "base-all", "--release", "base-shard-0", *store]) == 2
    assert "derived from 'base', not from 'base-shard-0'" in capsys.readouterr().err
    # A release derived from a shard descends from the base through it.
    corpus = tmp_path / "more.txt"
    corpus.write_text("Pemberlyn's ninth bridge was built in 1962.\n", encoding="utf-8")
    assert main(["kb", "add", str(corpus), "--release", "base-shard-0", "--name", "base-shard-0-more", *store]) == 0
    assert main(["kb", "merge", "base-shard-0-more", "--release", "base", "--dry-run", *store]) == 0
    assert "base-shard-0-more: 3 references added, 0 removed" in capsys.readouterr().out


def test_a_merge_started_beside_the_shards_waits_for_each_to_be_published(bucket):
    said = []
    later = threading.Timer(0.5, bucket.put_bytes, (release_key("shard-1", MANIFEST_FILE), b"{}"))
    bucket.put_bytes(release_key("shard-0", MANIFEST_FILE), b"{}")
    bucket.put_bytes(release_key("shard-2", "index.faiss"), b"")  # being published: no manifest yet
    later.start()
    start = time.monotonic()
    wait_for_releases(bucket, ["shard-0", "shard-1"], 30, poll_s=0.1, log=said.append)
    assert 0.4 < time.monotonic() - start < 20
    assert said == ["waiting for 1 of 2 releases to be published: shard-1"]
    with pytest.raises(ReleaseNotFound, match=r"after 0.5 s, 1 of 2 releases are not published .*: shard-2$"):
        wait_for_releases(bucket, ["shard-0", "shard-2"], 0.5, poll_s=0.1, log=said.append)


def test_a_merge_job_started_before_the_store_answers_waits_for_it(bucket, local_s3, tmp_path, monkeypatch, capsys):
    embedder = Embedder()
    build_random_release(bucket, "base", embedder=embedder)
    _shard(bucket, tmp_path, embedder, "base-shard-0", SHARD_A)
    # A second server over the same files, on a port nothing listens on yet: the store of a Job
    # whose object store starts after it.
    port, config, servers = free_port(), bucket.config, []
    later = threading.Timer(3.0, lambda: servers.append(start_local_s3(
        local_s3.data_dir, port=port, access_key=config.access_key, secret_key=config.secret_key)))
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", config.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", config.secret_key)
    later.start()
    try:
        code = main(["kb", "merge", "base-shard-0", "--release", "base", "--name", "base-late", "--wait", "60",
                     "--s3-endpoint", f"127.0.0.1:{port}", "--s3-bucket", config.bucket,
                     "--cache-dir", str(tmp_path / "cli")])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "the store does not answer, trying again" in captured.err
        assert "release base-late (from base): 14 memories, 2 references added, 0 removed" in captured.out
        # Read through the server it was written to (rclone caches each server's view of the files).
        late_store = ObjectStore(dataclasses.replace(servers[0].config, bucket=config.bucket))
        assert read_manifest(late_store, "base-late").provenance["merged"] == ["base-shard-0"]
    finally:
        later.join()
        for server in servers:
            server.stop()


def test_release_show_says_what_a_release_derives_from_and_holds(bucket, tmp_path, embedder, monkeypatch, capsys):
    build_random_release(bucket, "base", embedder=embedder)
    _shard(bucket, tmp_path, embedder, "base-shard-0", SHARD_A)
    corpus = tmp_path / "fix.txt"
    corpus.write_text(SHARD_B[0] + "\n", encoding="utf-8")
    kb_add(bucket, "base-shard-0", [corpus], "base-fixed", tmp_path / "cache", remove_matches=["Skarn Point is"],
           embedder=embedder, progress=False)
    config = bucket.config
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", config.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", config.secret_key)
    store = ["--s3-endpoint", config.endpoint, "--s3-bucket", config.bucket, "--cache-dir", str(tmp_path / "cli")]
    assert main(["release", "show", "base-fixed", *store]) == 0
    out = capsys.readouterr().out
    assert "lineage   base-fixed <- base-shard-0 <- base (base was trained)" in out
    assert "memories  14 (" in out and "index     flat (kind asked: auto), 14 references" in out
    assert "changes   1 reference added, 1 reference removed" in out
    assert "file      references.jsonl" in out and "file      model/tokenizer.json" in out
    assert main(["release", "show", "base-fixed", "--json", *store]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ancestry"] == ["base-shard-0", "base"] and shown["index"]["kind"] == "flat"
    assert shown["memory_bank"] == read_manifest(bucket, "base-fixed").memory_bank
    # A deleted ancestor ends what is known.
    assert main(["release", "delete", "base-shard-0", *store]) == 0
    capsys.readouterr()
    assert main(["release", "show", "base-fixed", *store]) == 0
    assert "lineage   base-fixed <- base-shard-0 (base-shard-0 is deleted" in capsys.readouterr().out
    assert main(["release", "show", "no-such", *store]) == 2
    assert "release 'no-such' does not exist" in capsys.readouterr().err
