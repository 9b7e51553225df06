"""Index shards kept in the object store, so that a text-service shard is built once, not on every pod.

A text service started with `--index-shard I/N` serves every N-th row of its release's index. Built
from the whole index, that shard costs each new pod the whole index file's download and, for HNSW,
a graph built again (minutes a million references). The first pod to build shard I/N of an index
puts it here, and every later one (a restart on another node, a replica the autoscaler adds)
downloads the shard alone; `memory3 release shard-index` builds them all ahead of the pods.

The key is the index file's sha256 (its manifest checksum), not a release's name: the objects are a
pure function of that file and I/N, so releases with the same index share them, and no object is
ever written under a release's own prefix after its publication (a name it left there after a
deletion would read as a publication left half-written). A shard is trusted only when its sha256
matches the checksum object put after it; otherwise it is built again and put anew, never served.
`release delete` removes the shards of an index no other release has, and `release gc` those of
any index no published release has.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from ..retrieval.index import IndexShard, VectorIndex
from ..storage.object_store import ObjectNotFound, ObjectStore, StoreError

log = logging.getLogger("memory3.release")
INDEX_SHARDS_PREFIX = "index-shards/v1/"  # v1: shard I/N holds the index's rows I, I+N, ... in order
CHECKSUM_SUFFIX = ".sha256"


def shard_key(index_sha256: str, shard: IndexShard) -> str:
    return f"{INDEX_SHARDS_PREFIX}{index_sha256}/{shard.index}-of-{shard.count}.faiss"


def index_shards_dir(index_sha256: str) -> str:
    """The prefix of every shard kept of one index file."""
    return f"{INDEX_SHARDS_PREFIX}{index_sha256}/"


def kept_index_files(store: ObjectStore) -> list[str]:
    """The sha256 of every index file with shards kept in the store."""
    return [key[len(INDEX_SHARDS_PREFIX):].strip("/") for key in store.list_keys(INDEX_SHARDS_PREFIX, recursive=False)]


def fetch_shard(store: ObjectStore, index_sha256: str, shard: IndexShard, write: Callable[[Callable], None]) -> bool:
    """Shard `shard` of the index whose file has `index_sha256`, written through `write(download)`
    (which calls `download(path)` for a file it then keeps): True once written and checked, False when
    the store has none, or one that does not match its checksum, or does not answer (the caller
    builds it then)."""
    key = shard_key(index_sha256, shard)
    try:
        expected = store.get_bytes(key + CHECKSUM_SUFFIX).decode().strip()
    except ObjectNotFound:
        return False
    except (StoreError, UnicodeDecodeError) as e:
        log.warning("could not read the checksum of index shard %s kept in the store (%s): building it", shard, e)
        return False

    def download(path: Path) -> None:
        with path.open("wb") as out:
            digest = store.download(key, out)
        if digest != expected:
            raise _Mismatch(f"its sha256 is {digest}, its checksum object says {expected}")

    try:
        write(download)
    except (StoreError, OSError, _Mismatch) as e:  # OSError: the local copy could not be written
        log.warning("index shard %s kept in the store at %s cannot be used (%s): building it", shard, key, e)
        return False
    log.info("index shard %s downloaded from the store (%s)", shard, key)
    return True


def share_shard(store: ObjectStore, index_sha256: str, shard: IndexShard, index: VectorIndex) -> int:
    """Put a shard just built in the store, then its checksum (a shard without one is never used);
    returns its size in bytes. StoreError when the store refuses it."""
    key, data = shard_key(index_sha256, shard), index.to_bytes()
    store.put_bytes(key, data)
    store.put_bytes(key + CHECKSUM_SUFFIX, (hashlib.sha256(data).hexdigest() + "\n").encode(), "text/plain")
    return len(data)


def is_shared(store: ObjectStore, index_sha256: str, shard: IndexShard) -> bool:
    """Whether the store keeps that shard (its checksum, put last, is there)."""
    return store.exists(shard_key(index_sha256, shard) + CHECKSUM_SUFFIX)


class _Mismatch(Exception):
    pass
