"""Shards of a release's index and reference table kept in the object store, so that a text-service
shard is built once, not on every pod.

A text service started with `--index-shard I/N` serves every N-th row of its release's index, with
those rows of the reference table. Cut from the whole files, its shard costs each new pod both files'
downloads (the table holds every reference's text: tens of GB at 10^8) and, for HNSW, a graph built
again (minutes a million references). The first pod to cut shard I/N of a file puts it here, and
every later one (a restart on another node, a replica the autoscaler adds) downloads the shard
alone; `memory3 release shard-index` cuts them all ahead of the pods.

Under `shards/v1/<file's sha256>/`, not under a release: the objects are a function of that file
(its manifest checksum) and I/N, so releases with the same file share them, and nothing is written
under a release's own prefix after its publication (a name it left there after a deletion would read
as a publication left half-written). A shard is two objects: its bytes, named by their own sha256
(`I-of-N.<sha256>`), then a pointer (`I-of-N.json`) naming them with the shard's shape (rows, and an
index's dimension and kind). Pods that cut the same shard at once (HNSW builds differ) each put
their own bytes and a pointer to them, so whichever pointer is last names bytes that match it; a
reader checks the shape against what the manifest says and the bytes against their sha256, and cuts
the shard again (and puts it anew) on any mismatch, never serving it. `release delete` removes the
shards of a file no other release has, and `release gc` those of any file no published release has,
and bytes no pointer names, and with `--shard-counts` the shards of counts the text services no longer serve.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..retrieval.index import IndexShard, VectorIndex
from ..storage.object_store import ObjectNotFound, ObjectStore

log = logging.getLogger("memory3.release")
SHARDS_PREFIX = "shards/v1/"  # v1: shard I/N holds the file's rows I, I+N, ... in order
SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD_NAME = re.compile(r"\d+-of-(\d+)\.(?:json|[0-9a-f]{64})")  # a pointer_key's or a bytes_key's last part
UNNAMED_GRACE_S = 3600.0  # `release gc` leaves shard bytes no pointer names until they are this old


@dataclass(frozen=True)
class ShardShape:
    """What a shard must be to serve: its rows, and an index shard's dimension and kind."""

    rows: int
    dim: int = 0
    kind: str = ""


def shape_of(index: VectorIndex) -> ShardShape:
    return ShardShape(len(index.ids), int(index.index.d), index.kind)


@dataclass(frozen=True)
class _Pointer:
    sha256: str
    bytes: int
    shape: ShardShape

    @classmethod
    def parse(cls, data: bytes) -> _Pointer:
        """ValueError (KeyError, TypeError) for anything but a pointer `share_shard` wrote."""
        raw = json.loads(data)
        pointer = cls(str(raw["sha256"]), int(raw["bytes"]), ShardShape(int(raw["rows"]), int(raw["dim"]),
                                                                       str(raw["kind"])))
        if not SHA256.fullmatch(pointer.sha256):
            raise ValueError(f"sha256 {pointer.sha256!r} is not one")
        return pointer

    def to_json(self) -> bytes:
        return json.dumps({"sha256": self.sha256, "bytes": self.bytes, **asdict(self.shape)}).encode()


def shards_dir(file_sha256: str) -> str:
    """The prefix of every object kept for the shards of one file."""
    return f"{SHARDS_PREFIX}{file_sha256}/"


def pointer_key(file_sha256: str, shard: IndexShard) -> str:
    return f"{shards_dir(file_sha256)}{shard.index}-of-{shard.count}.json"


def bytes_key(file_sha256: str, shard: IndexShard, sha256: str) -> str:
    return f"{shards_dir(file_sha256)}{shard.index}-of-{shard.count}.{sha256}"


def kept_files(store: ObjectStore) -> list[str]:
    """The sha256 of every file with shards kept here (anything else under the prefix is not ours)."""
    found = (key[len(SHARDS_PREFIX):].strip("/") for key in store.list_keys(SHARDS_PREFIX, recursive=False))
    return [sha for sha in found if SHA256.fullmatch(sha)]


def unnamed_bytes(store: ObjectStore, file_sha256: str) -> list[str]:
    """The shard bytes kept for a file that no pointer names (those of a writer that lost a race), and
    pointers that cannot be read; of them, those written over `UNNAMED_GRACE_S` ago: a pod that has put
    its bytes and not yet its pointer, or one still downloading bytes a newer pointer no longer names,
    keeps them."""
    objects = store.list_ages(shards_dir(file_sha256))
    named, unreadable = set(), []
    for key, age in objects:
        if key.endswith(".json"):
            try:
                pointer = _Pointer.parse(store.get_bytes(key))
            except ObjectNotFound:
                continue
            except (ValueError, KeyError, TypeError):
                if age > UNNAMED_GRACE_S:
                    unreadable.append(key)
                continue
            shard = key[len(shards_dir(file_sha256)):].removesuffix(".json")
            named.add(f"{shards_dir(file_sha256)}{shard}.{pointer.sha256}")
    return [key for key, age in objects if not key.endswith(".json") and key not in named and age > UNNAMED_GRACE_S] \
        + unreadable


def shards_by_count(store: ObjectStore, file_sha256: str) -> dict[int, list[str]]:
    """The objects kept for a file's shards (pointers and bytes), by shard count N. Which counts the text
    services serve is the operator's to say (`release gc --shard-counts`): the bucket does not know."""
    prefix = shards_dir(file_sha256)
    found: dict[int, list[str]] = {}
    for key in store.list_keys(prefix):
        count = shard_count_of(key)
        if count is not None and key.rsplit("/", 1)[0] + "/" == prefix:
            found.setdefault(count, []).append(key)
    return found


def shard_count_of(key: str) -> int | None:
    """N of the shard an object under `shards_dir` is kept for (its pointer or its bytes), else None."""
    named = _SHARD_NAME.fullmatch(key.rsplit("/", 1)[-1])
    return None if named is None else int(named.group(1))


def fetch_shard(store: ObjectStore, file_sha256: str, shard: IndexShard, shape: ShardShape,
                write: Callable[[Callable[[Path], None]], None]) -> bool:
    """Shard `shard` of the file whose sha256 is `file_sha256`, if the store keeps one of `shape`,
    written through `write(download)` (which calls `download(path)` for a file it then keeps): True once
    written and checked; False when the store has none, or one that is not that shard (another shape,
    bytes that do not match their sha256): the caller cuts it then. A store that does not answer, or
    a disk that refuses the copy, is raised: cutting would need the store, and the disk, far more."""
    key = pointer_key(file_sha256, shard)
    try:
        pointer = _Pointer.parse(store.get_bytes(key))
    except ObjectNotFound:
        return False
    except (ValueError, KeyError, TypeError) as e:
        log.warning("shard %s kept in the store cannot be read (%s: %s): cutting it", shard, key, e)
        return False
    if pointer.shape != shape:
        log.warning("shard %s kept in the store at %s is %s, where %s was expected: cutting it", shard, key,
                    pointer.shape, shape)
        return False
    where = bytes_key(file_sha256, shard, pointer.sha256)

    def download(path: Path) -> None:
        with path.open("wb") as out:
            digest = store.download(where, out)
        if digest != pointer.sha256:
            raise _Mismatch(f"its sha256 is {digest}, where its name says {pointer.sha256}")

    try:
        write(download)
    except (ObjectNotFound, _Mismatch) as e:
        log.warning("shard %s kept in the store at %s cannot be used (%s): cutting it", shard, where, e)
        return False
    log.info("shard %s downloaded from the store (%s)", shard, where)
    return True


def share_shard(store: ObjectStore, file_sha256: str, shard: IndexShard, path: Path, sha256: str,
                shape: ShardShape) -> str:
    """Put the shard kept at `path` (whose sha256 is `sha256`, of `shape`: for an index, `shape_of` the
    index written there) in the store, streamed, then its pointer; returns where its bytes went.
    StoreError when the store refuses it."""
    where = bytes_key(file_sha256, shard, sha256)
    store.put_file(where, path)
    store.put_bytes(pointer_key(file_sha256, shard), _Pointer(sha256, path.stat().st_size, shape).to_json(),
                    "application/json")
    return where


def is_shared(store: ObjectStore, file_sha256: str, shard: IndexShard, shape: ShardShape) -> bool:
    """Whether the store keeps that shard, of that shape, with bytes of the size its pointer says (their
    sha256 is checked when a pod downloads them)."""
    try:
        pointer = _Pointer.parse(store.get_bytes(pointer_key(file_sha256, shard)))
        return pointer.shape == shape and store.size(bytes_key(file_sha256, shard, pointer.sha256)) == pointer.bytes
    except (ObjectNotFound, ValueError, KeyError, TypeError):
        return False


class _Mismatch(Exception):
    pass
