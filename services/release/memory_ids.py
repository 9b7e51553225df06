"""`memory_ids.npy`: what the memory service needs of a release's reference table, and nothing else.

The memory service needs each reference's id and its memory's sha256, never the texts; the table
(`references.jsonl`) holds them all, so every memory pod downloaded tens of GB at the design's 10^8
references to keep ~6 GB of them. This file holds a numpy structured array, one row per reference
sorted by id: `id` (bytes, as wide as the longest id) and `sha256` (32 bytes, all zero where the
table records none). It is opened memory-mapped: its pages are the page cache's, read as lookups
touch them. It is trusted by the manifest's checksum, as every file of a release is.

A release lists it only when every row's bank key is derived from its id (`memory_key`), as every
publication here makes them; otherwise only the table can say where a memory is, and the memory
service reads the table.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..retrieval.index import id_array
from .manifest import ReleaseError, memory_key

MEMORY_IDS_FILE = "memory_ids.npy"
_DIGEST_BYTES = 32
T = TypeVar("T")
_PART_ROWS = 1 << 18  # rows turned into arrays at a time: their Python objects never pile up


def memory_ids_dtype(id_width: int) -> np.dtype:
    return np.dtype([("id", f"S{id_width}"), ("sha256", np.uint8, (_DIGEST_BYTES,))])


def id_digest_arrays(rows: Iterable[dict], bank: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Of a reference table's rows (read once, a part at a time, their Python objects never piling up):
    the ids, in row order (numpy bytes, as wide as the longest); the sha256 of each one's memory ((N, 32)
    uint8, zeros where the row records none); and the bank keys that are not `memory_key(bank, id)`."""
    id_parts, digest_parts, keys_apart = [], [], {}
    for part in _parts(rows):
        keys_apart.update((row["id"], row["memory_key"]) for row in part
                          if row["memory_key"] != memory_key(bank, row["id"]))
        id_parts.append(np.array([row["id"].encode() for row in part], dtype=np.bytes_))  # (n,) S<longest>
        digest_parts.append(np.frombuffer(b"".join(bytes.fromhex(row["memory_sha256"]) if "memory_sha256" in row
                                                    else bytes(_DIGEST_BYTES) for row in part),
                                          dtype=np.uint8).reshape(-1, _DIGEST_BYTES))
    if not id_parts:
        return np.zeros(0, dtype="S1"), np.zeros((0, _DIGEST_BYTES), dtype=np.uint8), {}
    return np.concatenate(id_parts), np.concatenate(digest_parts), keys_apart


def write_memory_ids(rows: Iterable[dict], bank: str, path: Path) -> bool:
    """The ids and sha256 of `rows` (a reference table, read once, a part at a time) in `path`; False,
    and nothing written, when a row names a bank key other than its id's."""
    ids, digests, keys_apart = id_digest_arrays(rows, bank)
    if keys_apart:
        return False
    table = np.zeros(len(ids), dtype=memory_ids_dtype(max(ids.dtype.itemsize, 1)))
    table["id"], table["sha256"] = ids, digests
    table.sort(order="id", kind="stable")
    if len(table) > 1 and not (table["id"][1:] > table["id"][:-1]).all():
        raise ValueError("the reference table lists an id twice")
    np.save(path, table, allow_pickle=False)
    return True


def sorted_ids(ids: Iterable[str] | np.ndarray) -> np.ndarray:
    """`ids` (read once, a part at a time; or `id_array` of them) sorted, as numpy bytes: ~32 bytes an
    id where a set of them takes ~80."""
    return np.sort(id_array(ids))


def row_of(ids: np.ndarray, rid: str) -> int | None:
    """The row of `rid` in sorted `ids` (`sorted_ids`, or a release's `memory_ids.npy`), or None: a
    binary search (microseconds)."""
    try:
        want = rid.encode()
    except UnicodeEncodeError:  # not text (a command line's bytes that are not UTF-8): no id
        return None
    at = int(np.searchsorted(ids, want))
    return at if at < len(ids) and ids[at] == want else None


def holds(ids: np.ndarray, rid: str) -> bool:
    """Whether sorted `ids` hold `rid` (`row_of`)."""
    return row_of(ids, rid) is not None


def _parts(items: Iterable[T]) -> Iterator[list[T]]:
    items = iter(items)
    while part := list(itertools.islice(items, _PART_ROWS)):
        yield part


def read_memory_ids(path: Path, count: int) -> np.ndarray:
    """The array in `path`, memory-mapped; ReleaseError unless it is one of `count` rows of this layout."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{MEMORY_IDS_FILE} does not read as a numpy array: {e}") from e
    names = table.dtype.names or ()
    if (names != ("id", "sha256") or table.ndim != 1 or table.dtype["id"].kind != "S"
            or table.dtype["sha256"] != np.dtype((np.uint8, (_DIGEST_BYTES,)))):
        raise ReleaseError(f"{MEMORY_IDS_FILE} holds {table.dtype} of shape {table.shape}, not rows of "
                           f"{memory_ids_dtype(32)}")
    if len(table) != count:
        raise ReleaseError(f"{MEMORY_IDS_FILE} holds {len(table)} rows, where the release lists {count} memories")
    return table
