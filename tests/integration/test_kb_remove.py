"""kb remove on a real S3 server: a derived release without some references, nothing re-encoded."""

import json

import pytest
from release_fixtures import build_random_release

from memory3.services.cli.main import main
from memory3.services.release.catalog import plan_deletion, read_catalog
from memory3.services.release.reader import Release
from memory3.services.retrieval.embedder import Embedder
from memory3.services.trainer.releases import kb_add, kb_remove, references_to_remove

pytestmark = pytest.mark.integration



def cli_store(bucket, monkeypatch, cache_dir) -> list[str]:
    """The CLI options (and credentials, from the environment as in a pod) that reach `bucket`."""
    config = bucket.config
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", config.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", config.secret_key)
    return ["--s3-endpoint", config.endpoint, "--s3-bucket", config.bucket, "--cache-dir", str(cache_dir)]

def test_a_release_without_the_references_that_state_a_fact(bucket, tmp_path):
    embedder = Embedder()
    build_random_release(bucket, "base", embedder=embedder)
    base = Release.open(bucket, "base", tmp_path / "cache")
    chosen = references_to_remove(base, matches=["Pemberlyn"])
    assert len(chosen) == 2 and all("Pemberlyn" in r["text"] for r in chosen)
    by_id = references_to_remove(base, ids=[chosen[0]["id"]])
    assert by_id == chosen[:1]

    manifest = kb_remove(bucket, base, chosen, "base-rm", progress=False)
    assert manifest.parent == "base" and manifest.memory_bank["bank"] == base.manifest.memory_bank["bank"]
    assert manifest.memory_bank["count"] == len(base.references) - 2
    child = Release.open(bucket, "base-rm", tmp_path / "cache")
    kept = [r["id"] for r in base.references if r not in chosen]
    assert list(child.by_id) == kept and list(child.index().iter_ids()) == kept
    # Every kept vector still belongs to its reference: each text finds itself first.
    texts = [child.by_id[i]["text"] for i in kept]
    hits = child.index().search(embedder.embed(texts), 1)
    assert [h[0][0] for h in hits] == kept
    assert all(h[0][0] not in {r["id"] for r in chosen}
               for h in child.index().search(embedder.embed([r["text"] for r in chosen]), 3))
    assert len(child.fetch_memories(kept)) == len(kept)
    # Its memories are all the parent's: deleting it removes none of them.
    plan = plan_deletion(bucket, "base-rm")
    assert plan.memory_keys == [] and plan.kept == len(kept)


def test_what_to_remove_must_be_said_found_and_not_everything(bucket, tmp_path):
    build_random_release(bucket, "base")
    base = Release.open(bucket, "base", tmp_path / "cache")
    for ids, matches, error in (((), (), "say which references"), (["nope"], (), "no reference 'nope'"),
                                ((), [""], "needs some text"), ((), ["Atlantis"], "contains 'Atlantis'")):
        with pytest.raises(ValueError, match=error):
            references_to_remove(base, ids=ids, matches=matches)
    everything = references_to_remove(base, matches=[" "])  # what `kb add` may replace
    assert everything == base.references
    with pytest.raises(ValueError, match="every reference of release 'base': a release needs at least one"):
        kb_remove(bucket, base, everything, "base-empty", progress=False)
    assert [m.name for m in read_catalog(bucket).published] == ["base"]


def test_kb_remove_command_lists_what_goes_and_publishes_nothing_on_a_dry_run(bucket, tmp_path, monkeypatch,
                                                                                capsys):
    build_random_release(bucket, "base")
    config = bucket.config
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", config.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", config.secret_key)
    store = ["--s3-endpoint", config.endpoint, "--s3-bucket", config.bucket, "--cache-dir", str(tmp_path)]
    assert main(["kb", "remove", "--release", "base", "--match", "Skarn Point", "--dry-run", *store]) == 0
    out = capsys.readouterr().out
    assert out.count("Skarn Point") == 2 and "2 of the 12 references" in out
    assert [m.name for m in read_catalog(bucket).published] == ["base"]
    assert main(["kb", "remove", "--release", "base", "--match", "Skarn Point", "--name", "no-skarn", *store]) == 0
    assert "release no-skarn (from base): 10 memories, 2 references removed" in capsys.readouterr().out
    assert main(["kb", "remove", "--release", "base", "--match", "Atlantis", *store]) == 2
    assert "contains 'Atlantis'" in capsys.readouterr().err
    assert main(["kb", "remove", "--release", "base", "--match", " ", "--dry-run", *store]) == 2
    assert "every reference of release 'base'" in capsys.readouterr().err


def test_a_fact_corrected_in_one_release_by_kb_add_with_removals(bucket, tmp_path, monkeypatch, capsys):
    embedder = Embedder()
    build_random_release(bucket, "base", embedder=embedder)
    base = Release.open(bucket, "base", tmp_path / "cache")
    old = references_to_remove(base, matches=["Tomas Quell"])
    fix = tmp_path / "fix.txt"
    fix.write_text("Tomas Quell has kept the lighthouse at Skarn Point since 2001.\n")
    manifest = kb_add(bucket, "base", [fix], "base-fixed", tmp_path / "cache", remove_matches=["Tomas Quell"],
                      embedder=embedder, progress=False)
    assert manifest.parent == "base" and manifest.provenance["removed_references"] == len(old) == 1
    fixed = Release.open(bucket, "base-fixed", tmp_path / "cache")
    ids = list(fixed.by_id)
    assert old[0]["id"] not in ids and len(ids) == len(base.references)
    assert [r["text"] for r in fixed.references if "Tomas Quell" in r["text"]] == [fix.read_text().strip()]
    texts = [fixed.by_id[i]["text"] for i in ids]
    assert [hits[0][0] for hits in fixed.index().search(embedder.embed(texts), 1)] == ids
    assert len(fixed.fetch_memories(ids)) == len(ids)

    store = cli_store(bucket, monkeypatch, tmp_path / "cli")
    assert main(["kb", "add", str(fix), "--release", "base", "--remove-match", "Tomas Quell", "--name", "cli-fixed",
                 *store]) == 0
    assert "release cli-fixed (from base): 12 memories, 1 references removed" in capsys.readouterr().out
    assert main(["kb", "add", str(fix), "--release", "base", "--remove-id", "nope", *store]) == 2
    assert "has no reference 'nope'" in capsys.readouterr().err


def test_kb_add_may_replace_every_reference_of_its_parent(bucket, tmp_path, monkeypatch, capsys):
    """The new documents make the release: it was refused as if nothing were added."""
    embedder = Embedder()
    build_random_release(bucket, "base", embedder=embedder)
    new = tmp_path / "new.txt"
    new.write_text("Brask has one hill and forty goats.\n\nThe goats of Brask are milked at dawn.\n")
    manifest = kb_add(bucket, "base", [new], "base-replaced", tmp_path / "cache", remove_matches=["."],
                      embedder=embedder, progress=False)
    assert manifest.memory_bank["count"] == 2 and manifest.provenance["removed_references"] == 12
    replaced = Release.open(bucket, "base-replaced", tmp_path / "cache")
    assert [r["text"] for r in replaced.references] == ["Brask has one hill and forty goats.",
                                                        "The goats of Brask are milked at dawn."]
    ids = list(replaced.by_id)
    assert list(replaced.index().iter_ids()) == ids and len(replaced.fetch_memories(ids)) == 2
    assert [hits[0][0] for hits in replaced.index().search(embedder.embed([r["text"] for r in replaced.references]),
                                                             1)] == ids

    store = cli_store(bucket, monkeypatch, tmp_path / "cli")
    assert main(["kb", "add", str(new), "--release", "base", "--remove-match", " ", "--name", "cli-replaced",
                 *store]) == 0
    assert "release cli-replaced (from base): 2 memories, 12 references removed" in capsys.readouterr().out


def test_kb_add_and_remove_read_the_parents_table_a_row_at_a_time(bucket, tmp_path, document, monkeypatch):
    """They held the parent's whole reference table (texts included: tens of GB at 10^8 references), as a
    list, a dict by id and filtered copies; now its ids are held sorted and its rows read as they go."""
    import functools

    embedder = Embedder()
    build_random_release(bucket, "base", embedder=embedder)
    base = Release.open(bucket, "base", tmp_path / "cache")
    expected = list(base.rows())
    for whole in ("references", "by_id"):
        monkeypatch.setattr(Release, whole, functools.cached_property(
            lambda self, whole=whole: pytest.fail(f"the table was held whole ({whole})")))

    again = "Ilsa Varrow repairs clocks in the river town of Pemberlyn."  # removed, and added back at once
    documents = tmp_path / "added.jsonl"
    documents.write_text(json.dumps({"text": document.read_text().strip()}) + "\n" + json.dumps({"text": again}) + "\n")
    added = kb_add(bucket, "base", [documents], "base-added", tmp_path / "cache", embedder=embedder,
                   remove_matches=["Pemberlyn"], progress=False)
    removed = kb_remove(bucket, base, references_to_remove(base, matches=["Hallowmere"]), "base-rm", progress=False)
    monkeypatch.undo()
    child = Release.open(bucket, "base-added", tmp_path / "cache2")
    kept = [r for r in expected if "Pemberlyn" not in r["text"]]
    assert child.references[:len(kept)] == kept and added.memory_bank["count"] == len(kept) + 2
    assert [r["text"] for r in child.references[len(kept):]] == [document.read_text().strip(), again]
    assert again in [r["text"] for r in expected]
    assert list(child.index().iter_ids()) == [r["id"] for r in child.references]
    assert set(child.ids.tolist()) == {r["id"].encode() for r in child.references}  # memory_ids.npy agrees
    rm = Release.open(bucket, "base-rm", tmp_path / "cache2")
    assert rm.references == [r for r in expected if "Hallowmere" not in r["text"]] and removed.memory_bank[
        "count"] == len(rm.references)
    assert removed.memory_bank["bytes"] == sum(r["memory_bytes"] for r in rm.references)


def test_a_parents_rows_that_change_between_readings_publish_nothing(bucket, tmp_path):
    """Publishing reads the parent's rows twice: a table that differed the second time was published with
    the first reading's count. An iterator, which reads once, is read into a list as it always was."""
    from memory3.services.release.manifest import ReleaseNotFound
    from memory3.services.release.publish import publish_release
    from memory3.services.release.reader import read_manifest

    build_random_release(bucket, "base", embedder=Embedder())
    base = Release.open(bucket, "base", tmp_path / "cache")
    readings = []

    def changing():
        readings.append(1)
        rows = list(base.rows())
        return rows if len(readings) == 1 else rows[:-1]

    def publish(name, parent_references):
        return publish_release(bucket, name, model=base.load_model(), codec=base.text_codec(), references=[],
                               embed=None, embedder_name=base.manifest.index["embedder"],
                               memory_codec=base.memory_codec(), provenance={}, parent_index=base.index(),
                               parent_references=parent_references, parent="base", progress=False)

    with pytest.raises(RuntimeError, match="changed between two readings"):
        publish("changed", changing)
    with pytest.raises(ReleaseNotFound):
        read_manifest(bucket, "changed")
    manifest = publish("once", iter(base.rows()))
    assert manifest.memory_bank["count"] == base.count
    assert Release.open(bucket, "once", tmp_path / "cache2").references == list(base.rows())
