"""The memory service's reference table: the lookups the dicts it replaces answered, in a fraction of
their memory."""

import hashlib

import numpy as np
import pytest

from memory3.services.memory import table as table_module
from memory3.services.memory.table import ReferenceTable
from memory3.services.release.manifest import ReleaseError, memory_key
from memory3.services.release.memory_ids import MEMORY_IDS_FILE, read_memory_ids, write_memory_ids


def rows(count: int, bank: str = "bank1") -> list[dict]:
    out = []
    for i in range(count):
        rid = hashlib.sha256(str(i).encode()).hexdigest()[:32]
        row = {"id": rid, "text": f"reference {i}", "memory_key": memory_key(bank, rid)}
        if i % 3:  # rows of releases published before the table had digests have none
            row["memory_sha256"] = hashlib.sha256(rid.encode()).hexdigest()
        out.append(row)
    return out


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_the_table_answers_what_dicts_of_its_rows_answer(monkeypatch, chunk):
    from memory3.services.release import memory_ids

    monkeypatch.setattr(table_module, "_CHUNK_ROWS", chunk)  # rows walked 3 at a time, or at once
    monkeypatch.setattr(memory_ids, "_PART_ROWS", chunk)  # rows cut into arrays 3 at a time, or at once
    given = rows(10) + [{"id": "short", "memory_key": "memories/old-bank/sh/short"},  # another width, key apart
                        {"id": "ümlaut-id", "memory_key": memory_key("bank1", "ümlaut-id")}]
    table = ReferenceTable.from_rows(iter(given), "bank1")
    keys = {r["id"]: r["memory_key"] for r in given}
    digests = {r["id"]: bytes.fromhex(r["memory_sha256"]) for r in given if "memory_sha256" in r}
    assert dict(table.keys) == keys and len(table.keys) == len(keys)
    assert dict(table.digests) == digests and len(table.digests) == len(digests)
    assert table.keys_apart == {"short": "memories/old-bank/sh/short"}
    for absent in ("", "shor", "shortt", "0" * 32, "zzzz"):
        assert absent not in table.keys and table.digests.get(absent) is None
        with pytest.raises(KeyError):
            table.keys[absent]
    assert table.digests.get(given[0]["id"]) is None  # a row without a digest


def test_an_empty_table_knows_no_id():
    table = ReferenceTable.from_rows([], "bank1")
    assert len(table.keys) == 0 and "a" not in table.keys and dict(table.digests) == {}


def test_a_reference_costs_its_id_and_its_digest():
    """Dicts of the same rows took ~340 bytes a reference: 31 GiB at the design's 10^8."""
    table = ReferenceTable.from_rows(rows(20_000), "bank1")
    held = table.ids.nbytes + table.digest_rows.nbytes
    assert held / 20_000 <= 32 + 32


def test_memory_ids_answer_what_the_rows_answer(tmp_path):
    given = rows(50) + [{"id": "ümlaut-id", "memory_key": memory_key("bank1", "ümlaut-id")}]
    path = tmp_path / MEMORY_IDS_FILE
    assert write_memory_ids(given, "bank1", path)
    mapped = ReferenceTable.from_memory_ids(read_memory_ids(path, len(given)), "bank1")
    table = ReferenceTable.from_rows(given, "bank1")
    assert isinstance(read_memory_ids(path, len(given)), np.memmap)  # mapped, not read
    assert dict(mapped.keys) == dict(table.keys) and dict(mapped.digests) == dict(table.digests)
    assert len(mapped.digests) == len(table.digests) and mapped.digests.get(given[0]["id"]) is None
    for absent in ("", "ümlaut", "0" * 32, given[1]["id"] + "0"):
        assert absent not in mapped.keys


def test_memory_ids_are_not_written_for_a_key_apart(tmp_path):
    given = rows(3) + [{"id": "short", "memory_key": "memories/old-bank/sh/short"}]
    assert not write_memory_ids(given, "bank1", tmp_path / MEMORY_IDS_FILE)
    assert not (tmp_path / MEMORY_IDS_FILE).exists()


def test_an_id_listed_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        write_memory_ids(rows(3) + rows(1), "bank1", tmp_path / MEMORY_IDS_FILE)


@pytest.mark.parametrize("written, count, match", [
    (np.zeros(3, dtype=[("id", "S4"), ("sha256", np.uint8, (32,))]), 4, "holds 3 rows"),
    (np.zeros(3, dtype=[("id", "S4"), ("sha", np.uint8, (32,))]), 3, "not rows of"),
    (np.zeros(3, dtype=[("id", "S4"), ("sha256", np.uint8, (16,))]), 3, "not rows of"),
    (np.zeros((3, 2)), 3, "not rows of"),
    (None, 3, "does not read"),
])
def test_memory_ids_of_another_layout_are_refused(tmp_path, written, count, match):
    path = tmp_path / MEMORY_IDS_FILE
    if written is None:
        path.write_bytes(b"not numpy")
    else:
        np.save(path, written)
    with pytest.raises(ReleaseError, match=match):
        read_memory_ids(path, count)


def test_memory_ids_are_written_a_part_at_a_time_and_not_at_all_for_a_key_apart_late(tmp_path, monkeypatch):
    from memory3.services.release import memory_ids

    given = rows(11)
    whole = tmp_path / "whole.npy"
    assert write_memory_ids(given, "bank1", whole)
    monkeypatch.setattr(memory_ids, "_PART_ROWS", 2)  # 6 parts
    assert write_memory_ids(iter(given), "bank1", tmp_path / "parts.npy")
    assert (tmp_path / "parts.npy").read_bytes() == whole.read_bytes()
    late = given + [{"id": "short", "memory_key": "memories/old-bank/sh/short"}]
    assert not write_memory_ids(iter(late), "bank1", tmp_path / "late.npy") and not (tmp_path / "late.npy").exists()


def test_sorted_ids_and_holds():
    from memory3.services.release.memory_ids import holds, sorted_ids

    ids = sorted_ids(iter(["b2", "a1", "ümlaut", "c"]))
    assert ids.tolist() == sorted([b"b2", b"a1", "ümlaut".encode(), b"c"])
    assert all(holds(ids, rid) for rid in ("a1", "b2", "c", "ümlaut"))
    assert not any(holds(ids, rid) for rid in ("", "a", "b", "zz", "c0", "\udcff"))  # the last: not UTF-8
    assert not holds(sorted_ids([]), "a1")
