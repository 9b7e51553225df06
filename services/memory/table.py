"""A release's reference table as the memory service holds it: the ids it knows, each id's bank key,
and the sha256 of each id's memory.

Python dicts of them took ~340 bytes a reference: at the design's 10^8 references, 31 GiB in every
memory pod, and a pod of the chart's 2 GiB ended at about six million. Here the ids are sorted
fixed-width bytes, beside a matrix of digests: ~64 bytes a reference of 32-character ids, and those of
a release's `memory_ids.npy` (`from_memory_ids`) stay in the page cache, memory-mapped. A bank key
is derived from its id (`memory_key`), except for the rows that name another one, which are kept
apart. A lookup is a binary search (microseconds). A digest of zeros is none: the row records none.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from ..release.manifest import memory_key
from ..release.memory_ids import id_digest_arrays, row_of

_CHUNK_ROWS = 1 << 20  # rows of the table read at a time when walking it (it may be mapped)


class ReferenceTable:
    def __init__(self, ids: np.ndarray, digests: np.ndarray, bank: str, keys_apart: dict[str, str]) -> None:
        """`ids`: sorted bytes (numpy `S`); `digests`: (N, 32) uint8, row i the sha256 of id i's memory
        (zeros: none recorded); `keys_apart`: the bank keys that are not `memory_key(bank, id)`."""
        self.ids, self.digest_rows = ids, digests
        self.bank, self.keys_apart = bank, keys_apart
        self.keys: Mapping[str, str] = _Keys(self)
        self.digests: Mapping[str, bytes] = _Digests(self)

    @classmethod
    def from_rows(cls, rows: Iterable[dict], bank: str) -> ReferenceTable:
        """From the rows of a release's reference table (`Release.rows`), read one at a time."""
        ids, digests, keys_apart = id_digest_arrays(rows, bank)
        order = np.argsort(ids, kind="stable")  # (N,)
        return cls(ids[order], digests[order], bank, keys_apart)

    @classmethod
    def from_memory_ids(cls, table: np.ndarray, bank: str) -> ReferenceTable:
        """From a release's `memory_ids.npy` (`read_memory_ids`): sorted, every key derived from its id."""
        return cls(table["id"], table["sha256"], bank, {})

    def find(self, rid: str) -> int | None:
        """The row of `rid`, or None."""
        return row_of(self.ids, rid)

    def __len__(self) -> int:
        return len(self.ids)


class _Keys(Mapping[str, str]):
    """Reference id -> its bank key."""

    def __init__(self, table: ReferenceTable) -> None:
        self.table = table

    def __getitem__(self, rid: str) -> str:
        if self.table.find(rid) is None:
            raise KeyError(rid)
        return self.table.keys_apart.get(rid) or memory_key(self.table.bank, rid)

    def __contains__(self, rid: object) -> bool:
        return isinstance(rid, str) and self.table.find(rid) is not None

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[str]:
        return (rid.decode() for rid in self.table.ids)


class _Digests(Mapping[str, bytes]):
    """Reference id -> the sha256 of its memory, for the ids whose rows have one."""

    def __init__(self, table: ReferenceTable) -> None:
        self.table = table

    def __getitem__(self, rid: str) -> bytes:
        row = self.table.find(rid)
        digest = None if row is None else self.table.digest_rows[row]
        if digest is None or not digest.any():
            raise KeyError(rid)
        return digest.tobytes()

    def __len__(self) -> int:
        rows = self.table.digest_rows
        return sum(int(rows[start:start + _CHUNK_ROWS].any(axis=1).sum()) for start in range(0, len(rows), _CHUNK_ROWS))

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.table), _CHUNK_ROWS):  # a chunk at a time: the table may be mapped
            part = slice(start, start + _CHUNK_ROWS)
            yield from (rid.decode() for rid in self.table.ids[part][self.table.digest_rows[part].any(axis=1)])
