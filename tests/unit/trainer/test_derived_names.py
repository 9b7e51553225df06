"""Default names of derived releases: one name per request, another for any other request."""

from memory3.services.release.manifest import check_release_name
from memory3.services.trainer.releases import kb_add_name, kb_merge_name, kb_remove_name


def test_kb_add_names_differ_by_index_kind_file_format_and_removal_kind(tmp_path):
    """The index kind was left out of the hash: `kb add --index-kind hnsw` got the name of the
    release the same files had made with the parent's kind, and failed as 'already exists'."""
    text, jsonl, a, bc, ab, c = (tmp_path / n for n in ("f.txt", "f.jsonl", "a.txt", "bc.txt", "ab.txt", "c.txt"))
    for path, content in ((text, '{"text": "x"}\n'), (jsonl, '{"text": "x"}\n'), (a, "a"), (bc, "bc"), (ab, "ab"),
                          (c, "c")):
        path.write_text(content, encoding="utf-8")
    names = [kb_add_name("base", [text]), kb_add_name("base", [text], index_kind="hnsw"),
             kb_add_name("base", [text], index_kind="flat"), kb_add_name("base", [jsonl]),
             kb_add_name("base", [a, bc]), kb_add_name("base", [ab, c]),
             kb_add_name("base", [text], remove_ids=["x"]), kb_add_name("base", [text], remove_matches=["x"])]
    assert len(set(names)) == len(names) and all(n.startswith("base-kb-") for n in names)
    assert kb_add_name("base", [text], index_kind="hnsw") == kb_add_name("base", [text], index_kind="hnsw")


def test_parents_that_share_the_start_of_a_long_name_give_their_children_other_names(tmp_path):
    """Only the cut parent name was kept: two parents sharing their first 51 characters gave one name.
    The names of merges and removals still do not depend on the order they are given in."""
    corpus = tmp_path / "f.txt"
    corpus.write_text("A fact.\n", encoding="utf-8")
    one, two = "p" * 51 + "-one", "p" * 51 + "-two"
    for name_of in (lambda p: kb_add_name(p, [corpus]), lambda p: kb_remove_name(p, ["abc"]),
                    lambda p: kb_merge_name(p, ["shard-0"])):
        names = {name_of(one), name_of(two)}
        assert len(names) == 2 and all(check_release_name(n) and len(n) <= 63 for n in names)
    assert kb_merge_name("base", ["s-1", "s-0"]) == kb_merge_name("base", ["s-0", "s-1"])
    assert kb_merge_name("base", ["s-0", "s-1"]) != kb_merge_name("base", ["s-0"])
    assert kb_remove_name("base", ["b", "a"]) == kb_remove_name("base", ["a", "b"]) != kb_remove_name("base", ["a"])
    assert kb_remove_name("base", ["a"]).startswith("base-rm-")
    assert kb_merge_name("base", ["s"]).startswith("base-merge-")


def test_a_default_name_keeps_its_hash_however_long_the_parent():
    """Cut at 63 characters, the hash went first: two different inputs got one name, and a parent of
    63 characters gave its own name to its child."""
    for parent in ("small-v1", "l" * 59, "n" * 63):
        names = {kb_remove_name(parent, [i]) for i in ("a", "b")} | {kb_merge_name(parent, [i]) for i in ("a", "b")}
        assert len(names) == 4 and parent not in names
        assert all(check_release_name(n) and len(n) <= 63 for n in names)


def test_kb_add_without_a_name_publishes_under_the_default_name_of_its_request(tmp_path, monkeypatch):
    """`memory3 kb add` with another --index-kind got the name of the release the same files had made."""
    from types import SimpleNamespace

    from memory3.services.cli.commands import cmd_kb_add
    from memory3.services.storage.object_store import S3Config
    from memory3.services.trainer import releases

    corpus = tmp_path / "f.txt"
    corpus.write_text("A fact.\n", encoding="utf-8")
    published = []

    def kb_add(store, parent, files, name, cache_dir, **options):
        published.append(name)
        return SimpleNamespace(name=name, provenance={}, memory_bank={"count": 1})

    monkeypatch.setattr(releases, "kb_add", kb_add)
    s3 = S3Config(endpoint="127.0.0.1:1", access_key="k", secret_key="s")
    for kind in (None, "hnsw"):
        cmd_kb_add(s3, [corpus], parent="base", name=None, cache_dir=tmp_path, index_kind=kind)
    assert published == [kb_add_name("base", [corpus]), kb_add_name("base", [corpus], index_kind="hnsw")]
    assert len(set(published)) == 2
