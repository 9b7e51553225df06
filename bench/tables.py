"""Release-table benchmark: what the memory service and `release delete`/`gc` hold of a release's
reference table, and how long they take to read it, from `memory_ids.npy` against the table itself.

One synthetic release of N references (32-hex ids, ~600-character texts, as `kb` makes them), in a
temporary directory: its `references.jsonl` and its `memory_ids.npy`, written as publishing writes
them. Each reader is measured in the same run:

- memory service: the reference table it holds (`ReferenceTable.from_rows` over the table's rows,
  against `from_memory_ids` over the memory-mapped file), bytes of Python and numpy memory held per
  reference (tracemalloc; a mapped file's pages are the page cache's, counted apart), time to make it
  (timed apart, without tracemalloc),
  and time per lookup (`keys`, `digests`);
- `release delete`/`gc`: what a release lists, as the sets of key strings they held before
  (`set`), against `Listed` read from the table and from `memory_ids.npy`: bytes held per memory,
  peak memory while reading, and time; and the time to check a bank's listing against it
  (`unlisted`, a part of the bank at a time, against set lookups).

Every pair is checked to give the same answers, so that a figure never comes from a reader that
is wrong.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memory3.services.memory.table import ReferenceTable
from memory3.services.release.listed import Listed, _table_listing
from memory3.services.release.manifest import memory_key
from memory3.services.release.memory_ids import read_memory_ids, write_memory_ids

from .machine import machine_info

BANK = "0123456789abcdef0123"
TEXT_CHARS = 600  # a reference of ~128 tokens of English
LOOKUPS = 20_000


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rid = hashlib.sha256(f"reference {i}".encode()).hexdigest()[:32]
        rows.append({"id": rid, "text": f"{i} " + "x" * TEXT_CHARS, "source": f"doc-{i // 8}",
                     "memory_key": memory_key(BANK, rid), "memory_bytes": 4096,
                     "memory_sha256": hashlib.sha256(rid.encode()).hexdigest()})
    return rows


def _measured(read: Callable[[], Any], count: int) -> tuple[Any, dict]:
    """`read()`'s result, with the bytes it holds per item and its peak while reading (tracemalloc), and
    its time, from another call without tracemalloc (which slows Python allocations 3-4 times)."""
    started = time.perf_counter()
    read()
    seconds = time.perf_counter() - started
    tracemalloc.start()
    value = read()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, {"bytes_held_per_reference": held / count, "peak_mb": peak / 1e6, "read_s": seconds}


def _old_key_set(path: Path) -> set[str]:
    """What `release delete`/`gc` held of a release before `Listed`: its table's keys, as strings."""
    keys = set()
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            row = json.loads(line)
            keys.add(row.get("memory_key") or memory_key(BANK, row["id"]))
    return keys


def _rows_of(path: Path):
    with open(path, encoding="utf-8") as table:
        for line in table:
            if line.strip():
                yield json.loads(line)


def _lookup_us(table: ReferenceTable, ids: list[str]) -> float:
    started = time.perf_counter()
    for rid in ids:
        table.keys[rid], table.digests.get(rid)  # noqa: B018 - the lookups are what is timed
    return 1e6 * (time.perf_counter() - started) / len(ids)


def run_tables_bench(*, references: int = 1_000_000, log: Callable[[str], None] = lambda _: None) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        table_path, ids_path = Path(tmp) / "references.jsonl", Path(tmp) / "memory_ids.npy"
        log(f"writing a release of {references} references")
        rows = _rows(references)
        with open(table_path, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_memory_ids(rows, BANK, ids_path)
        asked = [rows[i]["id"] for i in rng.integers(0, references, LOOKUPS)]
        stray = [memory_key(BANK, f"{i:032x}") for i in range(1000)]  # left by failed publications
        bank_listing = [row["memory_key"] for row in rows] + stray
        del rows

        log("memory service: the table's rows, then memory_ids.npy")
        from_rows, rows_fig = _measured(lambda: ReferenceTable.from_rows(_rows_of(table_path), BANK), references)
        mapped, ids_fig = _measured(
            lambda: ReferenceTable.from_memory_ids(read_memory_ids(ids_path, references), BANK), references)
        for table, fig in ((from_rows, rows_fig), (mapped, ids_fig)):
            fig["lookup_us"] = _lookup_us(table, asked)
        ids_fig["mapped_file_bytes_per_reference"] = ids_path.stat().st_size / references
        same = all(from_rows.keys[r] == mapped.keys[r] and from_rows.digests[r] == mapped.digests[r] for r in asked)
        if not same:
            raise AssertionError("the two memory-service tables answer differently")

        log("release delete/gc: key strings, then Listed from the table and from memory_ids.npy")
        keys, set_fig = _measured(lambda: _old_key_set(table_path), references)
        from_table, table_fig = _measured(lambda: _table_listing(table_path, BANK), references)
        from_ids, listed_fig = _measured(
            lambda: Listed(BANK, np.array(read_memory_ids(ids_path, references)["id"])), references)
        if set(from_ids.keys()) != keys or len(from_table - from_ids) or len(from_ids - from_table):
            raise AssertionError("the listings differ")

        started = time.perf_counter()
        unlisted_set = [key for key in bank_listing if key not in keys]
        set_fig["bank_check_s"] = time.perf_counter() - started
        started = time.perf_counter()
        unlisted = [key for start in range(0, len(bank_listing), 1 << 16)
                    for key in from_ids.unlisted(bank_listing[start:start + (1 << 16)])]
        listed_fig["bank_check_s"] = time.perf_counter() - started
        if unlisted != unlisted_set or len(unlisted) != len(stray):
            raise AssertionError("the listings find other unlisted keys")

    memory_service = {"table_rows": rows_fig, "memory_ids": ids_fig}
    gc = {"key_set_from_table": set_fig, "listed_from_table": table_fig, "listed_from_memory_ids": listed_fig}
    summary = {
        "references": references,
        "memory_service_bytes_per_reference": {"table_rows": rows_fig["bytes_held_per_reference"],
                                               "memory_ids": ids_fig["bytes_held_per_reference"]},
        "memory_service_open_rows_over_memory_ids": rows_fig["read_s"] / ids_fig["read_s"],
        "gc_bytes_per_memory": {"key_set": set_fig["bytes_held_per_reference"],
                                "listed": listed_fig["bytes_held_per_reference"]},
        "gc_key_set_over_listed_bytes": set_fig["bytes_held_per_reference"] / listed_fig["bytes_held_per_reference"],
        "gc_read_table_over_memory_ids": set_fig["read_s"] / listed_fig["read_s"],
        "gc_bank_check_listed_over_set": listed_fig["bank_check_s"] / set_fig["bank_check_s"],
    }
    return {"benchmark": "tables", "setup": {"references": references, "text_chars": TEXT_CHARS,
                                             "lookups": LOOKUPS, "stray_keys": 1000, "machine": machine_info()},
            "memory_service": memory_service, "release_gc": gc, "summary": summary}
