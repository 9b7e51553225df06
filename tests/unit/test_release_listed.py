"""What releases list, as `release delete` and `release gc` compare it: sorted ids of one bank, and
the keys that are not derived from their ids, kept apart."""

import json

import numpy as np
import pytest

from memory3.services.release.listed import Listed, _table_listing, id_of_key
from memory3.services.release.manifest import memory_key


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
