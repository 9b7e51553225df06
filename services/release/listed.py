"""The memories releases list, as `release delete` and `release gc` compare them.

Held as sets of Python strings they took ~150 bytes a memory, and reading them meant parsing every
row of each reference table, texts included: at the design's 10^8 references, tens of GB read and
more held, for each release of a bank. Here a release's listing is read from its `memory_ids.npy`
where it has one that reads (the table otherwise, a row at a time) and held as its sorted ids (~32
bytes a memory); only keys that are not derived from their id and the bank's name (`memory_key`) are
kept as strings.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..retrieval.index import in_sorted
from ..storage.object_store import ObjectNotFound, ObjectStore
from .manifest import MEMORIES_PREFIX, Manifest, ReleaseError, memory_key, release_key
from .memory_ids import MEMORY_IDS_FILE, read_memory_ids
from .publish import REFERENCES_FILE

log = logging.getLogger("memory3.release")


class UnreadableTable(ReleaseError):
    """Every file that lists a published release's memories (its `memory_ids.npy`, its reference
    table) is missing or damaged: which memories it lists is unknown."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"the reference table of release {name!r} cannot be read ({why})")
        self.name, self.why = name, why


class Listed:
    """Memory keys of one bank: `ids`, sorted and distinct (numpy bytes), whose keys are
    `memory_key(bank, id)`, and `apart`, the keys that are not."""

    def __init__(self, bank: str, ids: np.ndarray | None = None, apart: frozenset[str] = frozenset()) -> None:
        self.bank, self.apart = bank, frozenset(apart)
        self.ids = np.zeros(0, dtype="S1") if ids is None else ids

    def __len__(self) -> int:
        return len(self.ids) + len(self.apart)

    def __and__(self, other: Listed) -> Listed:
        return Listed(self.bank, np.intersect1d(self.ids, other.ids, assume_unique=True), self.apart & other.apart)

    def __or__(self, other: Listed) -> Listed:
        return Listed(self.bank, np.union1d(self.ids, other.ids), self.apart | other.apart)

    def __sub__(self, other: Listed) -> Listed:
        return Listed(self.bank, np.setdiff1d(self.ids, other.ids, assume_unique=True), self.apart - other.apart)

    def keys(self) -> Iterator[str]:
        yield from (memory_key(self.bank, rid.decode()) for rid in self.ids)
        yield from sorted(self.apart)

    def unlisted(self, keys: Sequence[str]) -> list[str]:
        """Of `keys` (a part of a bank's listing), those this listing lacks: a binary search of the
        sorted ids for each (np.isin would sort the whole listing again for every part)."""
        ids = [id_of_key(self.bank, key) or "" for key in keys]
        asked = np.array([rid.encode() for rid in ids], dtype=np.bytes_)  # (K,)
        found = in_sorted(asked, self.ids) & np.array([bool(rid) for rid in ids], dtype=bool)  # (K,)
        return [key for key, hit in zip(keys, found, strict=True) if not hit and key not in self.apart]


def id_of_key(bank: str, key: str) -> str | None:
    """The reference id whose key in `bank` is `key` (`memory_key`: <bank>/<id[:2]>/<id>), or None
    when `key` is no such key. Read from the key's layout, as an id may hold a '/'."""
    head = f"{MEMORIES_PREFIX}{bank}/"
    if not key.startswith(head):
        return None
    rest = key[len(head):]  # <id[:2]>/<id>, or <c>/<c> for a one-character id
    if len(rest) >= 5 and rest[2] == "/" and rest[3:5] == rest[:2]:
        return rest[3:]
    if len(rest) == 3 and rest[1] == "/" and rest[0] == rest[2]:
        return rest[2]
    return None


def listing_files(manifest: Manifest) -> list[str]:
    """The files a release's listing may be read from, in the order tried: its ids where it has them
    (a few bytes a memory), then its reference table, which lists the same memories with their texts."""
    return [MEMORY_IDS_FILE, REFERENCES_FILE] if MEMORY_IDS_FILE in manifest.files else [REFERENCES_FILE]


def read_listed(store: ObjectStore, manifest: Manifest) -> Listed:
    """The memories a release lists, from the first of `listing_files` that can be read: a missing or
    damaged `memory_ids.npy` is one copy of the listing lost, not the listing, so the table is read
    instead (with a warning: it is far larger). UnreadableTable only when none can be read, as then
    no one knows which memories the release reads; an outage of the store is raised as it is."""
    failures: list[str] = []
    for file in listing_files(manifest):
        try:
            listed = _read_listing(store, manifest, file)
        except UnreadableTable as e:
            failures.append(e.why)
            continue
        if failures:
            log.warning("release %r: %s; what it lists is read from %s instead", manifest.name,
                        ", and ".join(failures), file)
        return listed
    raise UnreadableTable(manifest.name, ", and ".join(failures))


def _read_listing(store: ObjectStore, manifest: Manifest, file: str) -> Listed:
    """The listing in `file` of the release; UnreadableTable when it is missing or damaged. Damaged is
    judged by the manifest's checksum first: a table cut at a line's end parses, and lists fewer
    memories than the release reads."""
    bank = manifest.memory_bank["bank"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file
        try:
            with path.open("wb") as out:
                digest = store.download(release_key(manifest.name, file), out)
        except ObjectNotFound as e:
            raise UnreadableTable(manifest.name, f"{file} is missing") from e
        expected = manifest.files.get(file, {}).get("sha256")
        if expected is not None and digest != expected:
            raise UnreadableTable(manifest.name, f"{file} does not match the manifest's checksum")
        try:
            if file == MEMORY_IDS_FILE:
                return Listed(bank, np.array(read_memory_ids(path, manifest.memory_bank["count"])["id"]))
            return _table_listing(path, bank)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not UTF-8, not JSON, a row without an id
            raise UnreadableTable(manifest.name, f"{file} is damaged: {type(e).__name__}: {e}") from e


def _table_listing(path: Path, bank: str) -> Listed:
    ids: list[bytes] = []
    apart: set[str] = set()
    with path.open(encoding="utf-8", newline="\n") as table:  # rows end in \n: a text may hold U+2028
        for line in table:
            if line.strip():
                row = json.loads(line)
                key = row.get("memory_key") or memory_key(bank, row["id"])
                rid = id_of_key(bank, key)  # by its key: another row's id may name the same blob
                if rid is not None:
                    ids.append(rid.encode())
                else:
                    apart.add(key)
    return Listed(bank, np.unique(np.array(ids, dtype=np.bytes_)) if ids else None, frozenset(apart))
