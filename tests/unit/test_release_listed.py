"""What releases list, as `release delete` and `release gc` compare it: sorted ids of one bank, and
the keys that are not derived from their ids, kept apart."""

import hashlib
import json

import numpy as np
import pytest

from memory3.services.release.listed import Listed, UnreadableTable, _table_listing, id_of_key, read_listed
from memory3.services.release.manifest import Manifest, memory_key, release_key
from memory3.services.release.memory_ids import MEMORY_IDS_FILE, write_memory_ids
from memory3.services.release.publish import REFERENCES_FILE


def listed(ids, apart=()) -> Listed:
    return Listed("bank1", np.unique(np.array([i.encode() for i in ids], dtype=np.bytes_)), frozenset(apart))


def test_a_listing_compares_as_the_sets_of_its_keys():
    a = listed(["aa01", "aa02", "ab03", "ümlaut"], ["memories/old/aa/x"])
    b = listed(["aa02", "ümlaut", "zz09"], ["memories/old/aa/x", "memories/old/aa/y"])
    keys = {name: set(listing.keys()) for name, listing in (("a", a), ("b", b))}
    assert set((a & b).keys()) == keys["a"] & keys["b"]
    assert set((a | b).keys()) == keys["a"] | keys["b"]
    assert set((a - b).keys()) == keys["a"] - keys["b"]
    assert len(a) == 5 and len(a & b) == 3 and memory_key("bank1", "ab03") in keys["a"]
    assert len(Listed("bank1") | a) == 5 and len(a - Listed("bank1")) == 5


def test_unlisted_keys_of_a_bank_are_those_no_release_lists():
    a = listed(["aa01", "ab03"], ["memories/bank1/zz/kept-apart"])
    bank_keys = [memory_key("bank1", "aa01"), memory_key("bank1", "aa02"), memory_key("bank1", "ab03"),
                 "memories/bank1/zz/stray", "memories/bank1/zz/kept-apart",
                 "memories/bank1/ZZ/aa01"]  # the name of a listed id, not at its key
    assert a.unlisted(bank_keys) == [memory_key("bank1", "aa02"), "memories/bank1/zz/stray",
                                     "memories/bank1/ZZ/aa01"]


def test_a_table_lists_its_rows_ids_and_keeps_other_keys_apart(tmp_path):
    rows = [{"id": "aa01", "text": "one\u2028line", "memory_key": memory_key("bank1", "aa01")},
            {"id": "ab03", "text": "two"},  # rows of the first releases had no key: derived
            {"id": "ac04", "text": "three", "memory_key": "memories/old/ac/ac04"}]
    path = tmp_path / "references.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    table = _table_listing(path, "bank1")
    assert table.ids.tolist() == [b"aa01", b"ab03"] and table.apart == {"memories/old/ac/ac04"}


@pytest.mark.parametrize("rid", ["aa01", "a", "a/b", "ab/cd", "ümlaut"])
def test_a_key_gives_back_its_id(rid):
    assert id_of_key("bank1", memory_key("bank1", rid)) == rid
    assert id_of_key("bank2", memory_key("bank1", rid)) is None


@pytest.mark.parametrize("key", ["memories/bank1/zz/stray", "memories/bank1/aa01", "memories/bank1/",
                                 "memories/bank11/aa/aa01", "releases/x/aa/aa01"])
def test_a_key_of_no_id_gives_none(key):
    assert id_of_key("bank1", key) is None


def test_ids_holding_a_slash_or_one_character_are_found_listed():
    """The id was read as the key's last part: a listed `a/b` was taken for unlisted, and removed by gc."""
    a = listed(["a/b", "x", "xy"])
    keys = [memory_key("bank1", rid) for rid in ("a/b", "x", "xy", "b", "zz")]
    assert a.unlisted(keys) == [memory_key("bank1", "b"), memory_key("bank1", "zz")]
    assert Listed("bank1").unlisted(keys[:2]) == keys[:2] and a.unlisted([]) == []


def test_unlisted_searches_the_sorted_ids_without_sorting_them_again(monkeypatch):
    """np.isin sorted the whole listing again for every part of the bank's listing: quadratic in gc."""
    def refuse(*args, **kwargs):
        raise AssertionError("the listing was sorted again")

    a = listed([f"{i:032x}" for i in range(1000)])
    monkeypatch.setattr(np, "isin", refuse)
    monkeypatch.setattr(np, "sort", refuse)
    monkeypatch.setattr(np, "unique", refuse)
    assert a.unlisted([memory_key("bank1", f"{i:032x}") for i in range(995, 1005)]) == [
        memory_key("bank1", f"{i:032x}") for i in range(1000, 1005)]


def test_a_table_row_is_listed_by_its_key_whatever_its_id(tmp_path):
    """A row naming another id's key was kept apart, so that a release listing the same key by id did
    not share it, and a deletion of that release removed a blob the other one reads."""
    path = tmp_path / "references.jsonl"
    path.write_text(json.dumps({"id": "copy", "memory_key": memory_key("bank1", "abc")}) + "\n")
    assert len(listed(["abc"]) - _table_listing(path, "bank1")) == 0


def test_every_key_reads_back_as_its_id_and_no_other_key_does():
    """Over every id of up to 6 characters of 'a', 'b' and '/', and every string after the bank's
    prefix up to 7: a key gives its id back, and what it gives back is always the id of that key."""
    import itertools

    for n in range(1, 7):
        for chars in itertools.product("ab/", repeat=n):
            rid = "".join(chars)
            assert id_of_key("B", memory_key("B", rid)) == rid
    for n in range(8):
        for chars in itertools.product("ab/", repeat=n):
            key = "memories/B/" + "".join(chars)
            rid = id_of_key("B", key)
            assert rid is None or memory_key("B", rid) == key


class Store:
    """The objects of a release in memory, as `read_listed` downloads them; records what was read."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects, self.read = objects, []

    def download(self, key, out) -> str:
        from memory3.services.storage.object_store import ObjectNotFound

        self.read.append(key.rsplit("/", 1)[-1])
        if key not in self.objects:
            raise ObjectNotFound(key)
        out.write(self.objects[key])
        return hashlib.sha256(self.objects[key]).hexdigest()


REFS = [{"id": rid, "text": f"text of {rid}", "memory_key": memory_key("bank1", rid)} for rid in ("aa01", "ab03", "ü")]


def published(tmp_path, with_ids: bool = True) -> tuple[Store, Manifest]:
    """A release of REFS in bank1 as a publication writes it: its table, its `memory_ids.npy` unless
    `with_ids` is False (a release published before that file), and a manifest with their sha256."""
    files = {REFERENCES_FILE: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in REFS).encode()}
    if with_ids:
        assert write_memory_ids(REFS, "bank1", tmp_path / MEMORY_IDS_FILE)
        files[MEMORY_IDS_FILE] = (tmp_path / MEMORY_IDS_FILE).read_bytes()
    manifest = Manifest(name="rel", created="now", files={f: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
                                                          for f, d in files.items()},
                        conventions={}, memory_bank={"bank": "bank1", "count": len(REFS)}, index={}, provenance={})
    return Store({release_key("rel", f): d for f, d in files.items()}), manifest


def listed_keys(listing: Listed) -> set[str]:
    return set(listing.keys())


def test_a_release_is_listed_from_its_memory_ids_alone(tmp_path):
    store, manifest = published(tmp_path)
    assert listed_keys(read_listed(store, manifest)) == {memory_key("bank1", r["id"]) for r in REFS}
    assert store.read == [MEMORY_IDS_FILE]  # the table, texts and all, is never read


@pytest.mark.parametrize(("damage", "why"), [
    ("missing", "memory_ids.npy is missing"),
    ("cut", "memory_ids.npy does not match the manifest's checksum"),
    ("not numpy", "memory_ids.npy is damaged: ReleaseError: memory_ids.npy does not read as a numpy array"),
    ("too few rows", "memory_ids.npy is damaged: ReleaseError: memory_ids.npy holds 2 rows, where the release "
                     "lists 3 memories"),
])
def test_a_release_whose_memory_ids_cannot_be_read_is_listed_from_its_table(tmp_path, caplog, damage, why):
    """Its bank was left whole by `release gc`, and a deletion in it removed nothing, while its
    reference table, which lists the same memories, was intact."""
    store, manifest = published(tmp_path)
    key = release_key("rel", MEMORY_IDS_FILE)
    if damage == "missing":
        del store.objects[key]
    elif damage == "cut":
        store.objects[key] = store.objects[key][:-1]
    else:  # damaged as the manifest says it is: its checksum passes
        if damage == "not numpy":
            store.objects[key] = b"not an array"
        else:
            assert write_memory_ids(REFS[:2], "bank1", tmp_path / "short.npy")
            store.objects[key] = (tmp_path / "short.npy").read_bytes()
        manifest.files[MEMORY_IDS_FILE]["sha256"] = hashlib.sha256(store.objects[key]).hexdigest()
    with caplog.at_level("WARNING", logger="memory3.release"):
        listing = read_listed(store, manifest)
    assert listed_keys(listing) == {memory_key("bank1", r["id"]) for r in REFS}
    assert store.read == [MEMORY_IDS_FILE, REFERENCES_FILE]
    [warning] = caplog.messages
    assert warning.startswith(f"release 'rel': {why}") and warning.endswith(
        "; what it lists is read from references.jsonl instead")


def test_a_release_whose_memory_ids_and_table_cannot_be_read_is_unreadable(tmp_path, caplog):
    store, manifest = published(tmp_path)
    del store.objects[release_key("rel", MEMORY_IDS_FILE)]
    store.objects[release_key("rel", REFERENCES_FILE)] += b"{}\n"
    with pytest.raises(UnreadableTable) as raised:
        read_listed(store, manifest)
    assert raised.value.why == ("memory_ids.npy is missing, and references.jsonl does not match the manifest's "
                                "checksum")
    assert str(raised.value) == f"the reference table of release 'rel' cannot be read ({raised.value.why})"
    assert caplog.messages == []  # the error says it all


def test_a_release_without_memory_ids_is_listed_from_its_table_and_unreadable_without_it(tmp_path):
    store, manifest = published(tmp_path, with_ids=False)
    assert listed_keys(read_listed(store, manifest)) == {memory_key("bank1", r["id"]) for r in REFS}
    assert store.read == [REFERENCES_FILE]
    store.objects.clear()
    with pytest.raises(UnreadableTable, match=r"\(references.jsonl is missing\)$"):
        read_listed(store, manifest)
