"""What releases list, as `release delete` and `release gc` compare it: sorted ids of one bank, and
the keys that are not derived from their ids, kept apart."""

import json

import numpy as np

from memory3.services.release.listed import Listed, _table_listing
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
