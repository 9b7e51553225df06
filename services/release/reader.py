"""Opening a published release: manifest first, every file checked against its sha256."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from memory3.model.checkpoint import CONFIG_FILE, TOKENIZER_FILE, load_checkpoint
from memory3.model.codecs import MemoryCodec, VQCodec, codec_from_name
from memory3.model.memory import ExplicitMemory
from memory3.model.memory_format import MemoryFormatError, decode_memory
from memory3.model.model import Transformer
from memory3.model.tokenizer import TextCodec

from ..retrieval.index import IdsLike, IndexShard, VectorIndex, id_array
from ..storage.object_store import ObjectNotFound, ObjectStore, StoreError, StoreUnavailable
from .file_shards import ShardShape, fetch_shard, shape_of, share_shard
from .manifest import (
    Manifest,
    ReleaseError,
    ReleaseExists,
    ReleaseNotFound,
    check_release_name,
    release_key,
    sha256_of_file,
)
from .memory_ids import MEMORY_IDS_FILE, read_memory_ids, sorted_ids
from .publish import CODEC_FILE, INDEX_FILE, MANIFEST_FILE, POSITION_SCHEME, REFERENCES_FILE

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("memory3.release")
# Beside a release's local copy: the shards cut from its index and reference table, under each
# file's sha256 (`Release.index_shard`, `Release.reference_shard`).
SHARDS_DIR = "index-shards"
# A manifest's index `type` (FAISS's class) as a kind, for releases whose manifest has no `kind`.
FAISS_KINDS = {"IndexFlatIP": "flat", "IndexHNSWFlat": "hnsw", "IndexIVFPQ": "ivfpq"}


def read_manifest(store: ObjectStore, name: str) -> Manifest:
    """A published release's manifest; ReleaseNotFound without one, ReleaseError if unreadable."""
    check_release_name(name)
    try:
        return Manifest.from_json(store.get_bytes(release_key(name, MANIFEST_FILE)).decode())
    except ObjectNotFound as e:
        raise ReleaseNotFound(f"release {name!r} does not exist (no manifest in bucket {store.bucket})") from e


def ancestry(store: ObjectStore, name: str, *, until: str | None = None, limit: int = 1000) -> list[str]:
    """The releases `name` was derived from, its parent first, up to `until` or the first release
    (trained, not derived). A deleted ancestor ends the list: what it derived from is unknown."""
    chain, parent = [], read_manifest(store, name).parent
    while parent is not None and parent != until and len(chain) < limit:
        if parent == name or parent in chain:
            raise ReleaseError(f"release {name!r} derives from itself through {' <- '.join(chain)}")
        chain.append(parent)
        try:
            parent = read_manifest(store, parent).parent
        except ReleaseNotFound:
            return chain
    return chain if parent is None else [*chain, parent]


def already_published(store: ObjectStore, name: str, *, exist_ok: bool,
                      differs: Callable[[Manifest], str | None]) -> bool:
    """Whether the work that would publish `name` is done already, checked before that work starts.

    False while no release has that name. With `exist_ok`, True if the published one was made
    from the same inputs (`differs` returns None; otherwise it says how they differ), so a Job
    that runs again, after a retry or a `helm upgrade`, does nothing. Anything else is
    ReleaseExists: releases are immutable.
    """
    try:
        manifest = read_manifest(store, name)
    except ReleaseNotFound:
        return False
    if not exist_ok:
        raise ReleaseExists(f"release {name!r} already exists; releases are immutable: choose another name "
                            "(--exist-ok accepts one published from the same inputs)")
    why = differs(manifest)
    if why:
        raise ReleaseExists(f"release {name!r} already exists, made from other inputs ({why}); releases are "
                            "immutable: choose another name")
    return True


def once_the_store_answers(call: Callable[[], T], timeout_s: float, *, poll_s: float = 2.0,
                           log: Callable[[str], None] = print) -> T:
    """`call()`, tried again while the object store does not answer, for up to `timeout_s`; then its
    StoreUnavailable. For work started beside the store, as a chart's Jobs are."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except StoreUnavailable as e:
            now = time.monotonic()
            if now >= deadline:
                raise
            log(f"the store does not answer, trying again for {deadline - now:.0f} s: {e}")
            time.sleep(min(poll_s, deadline - now))


def wait_for_releases(store: ObjectStore, names: Sequence[str], timeout_s: float, *, poll_s: float = 10.0,
                      log: Callable[[str], None] = print, report_every_s: float = 60.0) -> None:
    """Return once every release of `names` is published (its manifest exists), or raise
    ReleaseNotFound naming those that are not after `timeout_s`.

    For work started beside the jobs that publish its inputs, like the merge of the encoding Job's
    shards: an object store that does not answer for a while is waited for too.
    """
    for name in names:
        check_release_name(name)
    deadline = time.monotonic() + timeout_s
    missing, reported = list(names), float("-inf")
    while True:
        try:
            missing = [n for n in missing if not store.exists(release_key(n, MANIFEST_FILE))]
            unavailable = None
        except StoreUnavailable as e:
            unavailable = e
        if not missing:
            return
        now = time.monotonic()
        if now >= deadline:
            raise ReleaseNotFound(f"after {timeout_s:g} s, {len(missing)} of {len(names)} releases are not published "
                                  f"in bucket {store.bucket}: {', '.join(missing)}"
                                  + (f" (the store does not answer: {unavailable})" if unavailable else ""))
        if now - reported >= report_every_s:
            reported = now
            log(f"waiting for {len(missing)} of {len(names)} releases to be published: {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                + (f" (the store does not answer: {unavailable})" if unavailable else ""))
        time.sleep(min(poll_s, deadline - now))


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(file)` to a temporary file beside `path`, then renamed to it: `path` is never partial, and
    processes sharing a cache (the local stack's index shards) each replace it whole."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".part", delete=False) as tmp:
        pass
    try:
        write(Path(tmp.name))
        Path(tmp.name).replace(path)
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def _fetch(store: ObjectStore, name: str, manifest: Manifest, local: Path, file: str) -> None:
    """File `file` of release `name` (whose manifest may record another name: a copy keeps the
    original's) into its local copy `local`, unless a verified copy is there."""
    meta = manifest.files[file]
    path = local / file
    if path.exists() and path.stat().st_size == meta["bytes"] and sha256_of_file(path) == meta["sha256"]:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Streamed (a file is never held whole in memory), and written whole (`_write_whole`): processes
    # sharing a cache (the local stack's index shards) may download it at once.
    _write_whole(path, functools.partial(_download, store, name, file, meta["sha256"]))


def _download(store: ObjectStore, name: str, file: str, sha256: str, to: Path) -> None:
    """File `file` of release `name` into `to`; ReleaseError unless it matches its manifest checksum."""
    with to.open("wb") as out:
        digest = store.download(release_key(name, file), out)
    if digest != sha256:
        raise ReleaseError(f"release {name!r}: {file} does not match its manifest checksum")


def _kept(path: Path, read: Callable[[Path], R]) -> R | None:
    """`read(path)` of the shard kept at `path` when its checksum, written after it, matches it; None
    when there is none, or it is partial, damaged or not what `read` expects (a ValueError): it is then
    cut again, never served."""
    try:
        if _checksum_path(path).read_text().strip() == sha256_of_file(path):
            return read(path)
        why = "it does not match its checksum"
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: FAISS could not read it
        why = str(e)
    log.warning("the shard kept at %s is damaged (%s): cutting it again", path, why)
    return None


def _read_rows(path: Path, count: int) -> list[dict]:
    """The rows of a reference table's shard kept at `path`; ValueError unless there are `count`."""
    with open(path, encoding="utf-8") as table:
        rows = [json.loads(line) for line in table if line.strip()]
    if len(rows) != count:
        raise ValueError(f"it holds {len(rows)} rows, where the shard has {count}")
    return rows


def _share(store: ObjectStore, file: str, file_sha256: str, shard: IndexShard, kept: Path, shape: ShardShape) -> None:
    """Put shard `shard` of `file` (kept at `kept`) in the store, for the pods after this one. It goes
    from a link of its own to the kept file, hashed there: another process of the same shard sharing
    this cache (the local stack's) may replace the kept file meanwhile, and bytes of one would be put
    under the other's name."""
    link = kept.with_name(f"{kept.name}.{os.getpid()}.sharing")
    try:
        link.unlink(missing_ok=True)
        os.link(kept, link)
        share_shard(store, file_sha256, shard, link, sha256_of_file(link), shape)
    except (StoreError, OSError) as e:
        log.warning("could not keep shard %s of %s in the store (%s): the next pod cuts it too", shard, file, e)
    finally:
        link.unlink(missing_ok=True)


def _keep_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(file)` kept at `path`, then its checksum beside it, each written whole: a checksum that
    matches is there only for a complete file (`_kept`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_whole(path, write)
    checksum = sha256_of_file(path)
    _write_whole(_checksum_path(path), lambda file: file.write_text(checksum + "\n"))


class Release:
    """An opened release. Its reference table is read when first asked for (`references`, `by_id`),
    or row by row (`rows`): an index shard keeps a few rows of a table that may not fit its memory."""

    def __init__(self, store: ObjectStore, manifest: Manifest, local_dir: Path, *,
                 fetched: Collection[str] | None = None) -> None:
        self.store, self.manifest, self.local_dir = store, manifest, local_dir
        self._codec: MemoryCodec | None = None
        # The files known to be in the local copy, checked (None: all of them).
        self._fetched = None if fetched is None else set(fetched)

    def rows(self) -> Iterator[dict]:
        """The reference table's rows in order, one at a time."""
        with open(self.local_file(REFERENCES_FILE), encoding="utf-8") as table:
            for line in table:
                if line.strip():
                    yield json.loads(line)

    @functools.cached_property
    def references(self) -> list[dict]:
        return list(self.rows())

    @functools.cached_property
    def ids(self) -> np.ndarray:
        """The release's reference ids, sorted (numpy bytes; `memory_ids.holds` asks them): from its
        `memory_ids.npy` where it has one, else read from its table, without holding the table."""
        if MEMORY_IDS_FILE in self.manifest.files:
            return np.array(read_memory_ids(self.local_file(MEMORY_IDS_FILE), self.count)["id"])
        return sorted_ids(row["id"] for row in self.rows())

    @property
    def count(self) -> int:
        """How many references the release lists."""
        return int(self.manifest.memory_bank["count"])

    @functools.cached_property
    def by_id(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.references}

    @classmethod
    def open(cls, store: ObjectStore, name: str, cache_dir: Path, *, only: Collection[str] | None = None) -> Release:
        """Download (or reuse a verified local copy of) the release's files.

        `only` limits this to some of the manifest's files: a service that needs part of a release
        skips the rest (the memory service the weights and the index, the text service the weights,
        a decoder with remote retrieval the index and the reference table).
        """
        # Named as the bucket names it: a release copied to a new name (a promotion) keeps the original's
        # name in its manifest, and releases derived from the copy recorded, and checked for, the original.
        manifest = dataclasses.replace(read_manifest(store, name), name=name)
        local = cache_dir / name
        fetched = [file for file in manifest.files if only is None or file in only]
        for file in fetched:
            _fetch(store, name, manifest, local, file)
        return cls(store, manifest, local, fetched=None if only is None else fetched)

    def local_file(self, file: str) -> Path:
        """The local copy of one of the release's files, downloaded and checked now if `open` left it out."""
        if self._fetched is not None and file not in self._fetched:
            _fetch(self.store, self.name, self.manifest, self.local_dir, file)
            self._fetched.add(file)
        return self.local_dir / file

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def model_dir(self) -> Path:
        return self.local_dir / "model"

    def load_model(self, device: str = "cpu") -> Transformer:
        model = load_checkpoint(self.model_dir, device=device)
        conv = self.manifest.conventions
        c = model.config
        mine = {"memory_layers": list(c.memory_layers), "mem_tokens_per_head": c.mem_tokens_per_head,
                "chunk_len": c.chunk_len, "mems_per_chunk": c.mems_per_chunk, "ref_len": c.ref_len,
                "reference_prefix": c.reference_prefix}
        # Recorded by every publication, and checked where a release has them: memories laid out by
        # another position scheme, scored another way, or behind other prefix tokens decode wrong.
        recorded = {"position_scheme": POSITION_SCHEME, "score_reduction": c.score_reduction,
                    "reference_prefix_tokens": self.text_codec().reference_prefix(c)}
        mine.update({k: v for k, v in recorded.items() if k in conv})
        wrong = {k: (v, conv.get(k)) for k, v in mine.items() if conv.get(k) != v}
        if wrong:
            raise ReleaseError(f"release {self.name!r}: model config disagrees with the manifest's conventions {wrong}")
        return model

    def text_codec(self) -> TextCodec:
        return TextCodec.from_file(self.model_dir / TOKENIZER_FILE)

    def index(self, ids: IdsLike | None = None) -> VectorIndex:
        """The vector index; `ids` are the table's ids in order, when the caller has read them already
        (else read from the table a row at a time, never a list of them: `id_array`)."""
        if ids is None:
            rows = self.references if "references" in self.__dict__ else self.rows()
            ids = id_array(r["id"] for r in rows)
        return VectorIndex.read(self.local_file(INDEX_FILE), ids)

    def index_shard(self, shard: IndexShard, ids: IdsLike) -> VectorIndex:
        """Shard `shard` of the vector index (`ids`: the ids of its rows, those of `reference_shard`), in
        the memory of the shard alone (`VectorIndex.read_shard`). Cutting one costs the whole index
        file's download and, for HNSW, a graph built again (minutes a million references), so it is
        done once (`_file_shard`); the index file is downloaded only to cut it."""
        if shard.count == 1:
            return self.index(ids)
        return self._file_shard(INDEX_FILE, shard, "faiss", self.index_shape(shard),
                                read=lambda path: VectorIndex.read(path, ids),
                                cut=lambda: VectorIndex.read_shard(self.local_file(INDEX_FILE), ids, shard),
                                write=lambda index, path: index.write(path), shape_of_cut=shape_of)

    def reference_shard(self, shard: IndexShard) -> list[dict]:
        """The rows of the reference table that shard `shard` of the index holds, in order: a shard's
        texts, without the whole table's download (every reference's text), cut once (`_file_shard`)."""
        if shard.count == 1:
            return list(self.rows())
        count = self.shard_rows(shard)

        def write(rows: list[dict], path: Path) -> None:
            with open(path, "w", encoding="utf-8") as out:
                out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

        return self._file_shard(REFERENCES_FILE, shard, "jsonl", ShardShape(count),
                                read=lambda path: _read_rows(path, count),
                                cut=lambda: [row for i, row in enumerate(self.rows()) if shard.holds(i)],
                                write=write, shape_of_cut=lambda rows: ShardShape(len(rows)))

    def _file_shard(self, file: str, shard: IndexShard, suffix: str, shape: ShardShape, *,
                    read: Callable[[Path], R], cut: Callable[[], R], write: Callable[[R, Path], None],
                    shape_of_cut: Callable[[R], ShardShape]) -> R:
        """Shard `shard` of one of the release's files, of `shape`: `read` of the copy kept beside the
        local copy under the file's checksum, which a restart of the same shard reads; else of the
        object store's (file_shards.py), which a pod elsewhere downloads instead of the whole file;
        else `cut()` from the whole file now, kept (`write`), and put in the store for the pods after
        this one. A store that refuses it costs the next pod a cut, and a disk that refuses it the next
        start, not this one its start."""
        file_sha256 = self.manifest.files[file]["sha256"]
        kept = self.local_dir / SHARDS_DIR / file_sha256 / f"{shard.index}-of-{shard.count}.{suffix}"
        found = _kept(kept, read)
        if found is None and fetch_shard(self.store, file_sha256, shard, shape, functools.partial(_keep_file, kept)):
            found = _kept(kept, read)
        if found is not None:
            return found
        made = cut()
        made_shape = shape_of_cut(made)
        if made_shape.rows != shape.rows:
            raise ReleaseError(f"release {self.name!r}: shard {shard} of {file} has {made_shape.rows} rows, where its "
                               f"manifest's count gives {shape.rows}")
        try:
            _keep_file(kept, functools.partial(write, made))
        except (OSError, RuntimeError) as e:  # RuntimeError: FAISS could not write it
            log.warning("could not keep the shard at %s (%s): the next start cuts it again", kept, e)
            return made
        _share(self.store, file, file_sha256, shard, kept, made_shape)
        return made

    def shard_rows(self, shard: IndexShard) -> int:
        """How many rows of the index (and of the reference table) shard `shard` holds."""
        return len(range(shard.index, int(self.manifest.index["count"]), shard.count))

    def index_shape(self, shard: IndexShard) -> ShardShape:
        """What shard `shard` of this release's index is: its rows, their dimension and the index's kind."""
        meta = self.manifest.index
        return ShardShape(self.shard_rows(shard), int(meta["dim"]),
                          str(meta.get("kind") or FAISS_KINDS.get(meta.get("type"), "")))

    def memory_codec(self) -> MemoryCodec:
        if self._codec is None:
            name = self.manifest.memory_bank["codec"]
            codec = VQCodec.load(self.local_dir / CODEC_FILE) if name.startswith("vq") else codec_from_name(name)
            if codec.fingerprint().hex() != self.manifest.conventions["codec_fingerprint"]:
                raise ReleaseError(f"release {self.name!r}: codec does not match the manifest's fingerprint")
            self._codec = codec
        return self._codec

    def memory_shape(self) -> tuple[int, int, int, int]:
        config = json.loads((self.model_dir / CONFIG_FILE).read_text())
        return (len(config["memory_layers"]), config["n_kv_head"], config["mem_tokens_per_head"], config["head_dim"])

    def fetch_memories(self, ids: Sequence[str]) -> list[ExplicitMemory]:
        """Straight from the object store, each blob validated, and checked against the sha256 its row
        records, as the memory service checks it (which adds caches)."""
        codec, shape = self.memory_codec(), self.memory_shape()
        out = []
        for rid in ids:
            row = self.by_id.get(rid)
            if row is None:
                raise ReleaseError(f"reference {rid!r} is not in release {self.name!r}")
            blob = self.store.get_bytes(row["memory_key"])
            if "memory_sha256" in row and hashlib.sha256(blob).hexdigest() != row["memory_sha256"]:
                raise MemoryFormatError(f"release {self.name!r}: the bank's memory of {rid!r} is not the one its "
                                        "reference table records (its sha256 differs)")
            out.append(decode_memory(blob, codec, expected_shape=shape))
        return out
