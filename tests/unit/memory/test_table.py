"""The memory service's reference table: the lookups the dicts it replaces answered, in a fraction of
their memory."""

import hashlib

import pytest

from memory3.services.memory import table as table_module
from memory3.services.memory.table import ReferenceTable
from memory3.services.release.manifest import memory_key


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
    monkeypatch.setattr(table_module, "_CHUNK_ROWS", chunk)  # rows cut into arrays 3 at a time, or at once
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
    held = table.ids.nbytes + table.digest_rows.nbytes + table.has_digest.nbytes
    assert held / 20_000 <= 32 + 32 + 1
