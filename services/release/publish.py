"""Building and publishing a release to the object store, manifest last.

Order of writes: a publication lease (lease.py: one publisher per name), memory blobs
(content-addressed, shared), then the release's own files, then the manifest. If anything fails
before the manifest, the files this publisher wrote are removed and the error is raised: a reader
never sees a half-written release (without a manifest it does not exist). They are removed only
while its lease holds the name: once it lapsed, another publisher may have taken the name and
written files of the same names, or published them. Just before the manifest, the lease, the files
it lists and the releases it is made from are checked to be still there.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from memory3.model.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, save_checkpoint, weights_digest
from memory3.model.codecs import MemoryCodec, VQCodec
from memory3.model.encoder import encode_references
from memory3.model.memory_format import FORMAT_VERSION, MemoryFormatError, encode_memory, validate_memory
from memory3.model.model import Transformer
from memory3.model.tokenizer import TextCodec

from ..retrieval.index import VectorIndex, check_index_choice
from ..storage.object_store import ObjectNotFound, ObjectStore, StoreError
from ..trainer.kb import Reference
from .lease import Publication
from .manifest import (
    MANIFEST_FILE,
    Manifest,
    ReleaseError,
    ReleaseExists,
    bank_id,
    check_release_name,
    memory_key,
    release_key,
    sha256,
    sha256_of_file,
)
from .memory_ids import MEMORY_IDS_FILE, holds, sorted_ids, write_memory_ids

INDEX_FILE, REFERENCES_FILE, CODEC_FILE = "index.faiss", "references.jsonl", "codec.safetensors"
TOKENIZER_KEY = f"model/{TOKENIZER_FILE}"  # the tokenizer's name in a manifest's files
POSITION_SCHEME = "parallel: memory keys at [p, p+ref_len), context from p+ref_len (p = prefix tokens)"


def conventions(model: Transformer, codec: TextCodec, memory_codec: MemoryCodec) -> dict:
    c = model.config
    return {
        "memory_layers": list(c.memory_layers), "mem_tokens_per_head": c.mem_tokens_per_head,
        "chunk_len": c.chunk_len, "mems_per_chunk": c.mems_per_chunk, "ref_len": c.ref_len,
        "reference_prefix": c.reference_prefix, "reference_prefix_tokens": codec.reference_prefix(c),
        "position_scheme": POSITION_SCHEME, "score_reduction": c.score_reduction,
        "codec": memory_codec.name, "codec_fingerprint": memory_codec.fingerprint().hex(),
        "memory_format_version": FORMAT_VERSION,
    }


def _store_memory(store: ObjectStore, key: str, blob: bytes, codec: MemoryCodec,
                  shape: tuple[int, int, int, int]) -> bytes:
    """Put `blob` under `key` unless the bank holds a valid memory there; the blob it holds after.

    A bank is shared by the releases of one model, and a memory's key follows from its reference's
    text, while its bytes do not: encoded again (in another batch, on another device), the same
    reference gives other bytes within rounding. Another publication of it (a `kb add` sibling, an
    encoding shard whose documents overlap another's, a fact removed and added again) replaced the
    blob that published releases list by its sha256, and the memory service then refused it to them
    (DATA_LOSS). A corrupt or missing blob is written, as a repair. Two publications writing a new
    key at once may still both write it (S3 has no put-if-absent for every store)."""
    try:
        held = store.get_bytes(key)
    except ObjectNotFound:
        held = None
    if held is not None:
        try:
            validate_memory(held, codec, shape)
            return held
        except MemoryFormatError:
            pass
    store.put_bytes(key, blob)
    return blob


def publish_release(
    store: ObjectStore, name: str, *, model: Transformer, codec: TextCodec, references: Sequence[Reference],
    embed: Callable[[list[str]], object], embedder_name: str, memory_codec: MemoryCodec, provenance: dict,
    parent_index: VectorIndex | None = None, parent_references: Sequence[dict] | Callable[[], Iterable[dict]] = (),
    parent: str | None = None,
    batch_size: int = 32, progress: bool = True, log: Callable[[str], None] | None = None,
    on_encoded: Callable[[int, int], None] | None = None, index_kind: str = "auto", sources: Sequence[str] = (),
    as_read: Sequence[Manifest] = (),
) -> Manifest:
    """Encode memories for `references` (new ones only, for a derived release) and publish `name`.

    For a release derived from `parent` (same model), `parent_references` and `parent_index` carry
    the parent's table and index; only `references` are encoded and embedded. `parent_references`
    may be a function that reads the rows anew at each call (`Release.rows`): they are then read a few
    times, one row at a time, and never held (a table of 10^8 references is tens of GB). `on_encoded(done,
    total)` follows the encoding, batch by batch, for programs (the bar is for people).
    `index_kind` is one of `INDEX_CHOICES`, kept in the manifest for the releases derived from this one.
    `sources` are the releases other than `parent` whose memories it lists (a merge's), checked with
    the parent to be still published when the manifest is written; `as_read`, their manifests as they
    were read to prepare this one, to be still the same (not deleted and published anew meanwhile).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_release_name(name)
    if not callable(parent_references) and not isinstance(parent_references, Sequence):
        parent_references = list(parent_references)  # an iterator: read once, it could not be read again
    parent_rows = parent_references if callable(parent_references) else lambda: parent_references
    _check_reference_ids(references, parent_index.ids if parent_index is not None else
                         (row["id"] for row in parent_rows()))
    check_index_choice(index_kind, len(parent_index.ids) + len(references) if parent_index else len(references))
    store.ensure_bucket()
    _check_free(store, name)
    publication = Publication(store, name)
    publication.acquire()  # from here on this process alone writes under the name (published meanwhile: refused)
    written: list[str] = []
    try:
        sources = [*([parent] if parent else []), *sources]
        _check_sources(store, name, sources, as_read)
        manifest = _publish(store, name, model, codec, references, embed, embedder_name, memory_codec, provenance,
                            parent_index, parent_rows, parent, batch_size, progress, log, on_encoded,
                            index_kind, lambda files: (_check_sources(store, name, sources, as_read),
                                                       _check_files(store, name, files, publication)),
                            publication.check_held, written)
    except BaseException:
        _remove_written(store, name, written, publication)
        raise
    finally:
        publication.release()
    log(f"published release {name!r}: {manifest.memory_bank['count']} memories, "
        f"{manifest.memory_bank['bytes'] / 1e6:.1f} MB in bank {manifest.memory_bank['bank']}")
    return manifest


MAX_ID_CHARS = 128  # a reference id's; every row of `memory_ids.npy` is as wide as the longest


def _check_reference_ids(references: Sequence[Reference], parent_ids: Iterable[str] | np.ndarray) -> None:
    """ReleaseError naming the first reference id a release cannot hold, before anything is encoded: an
    empty or long one, one with a '/' (a bank key is <bank>/<id[:2]>/<id>), a control character (numpy
    byte strings, as `memory_ids.npy` holds them, drop a trailing NUL), or one listed twice."""
    if not references:
        return
    parents, seen = sorted_ids(parent_ids), set()
    for ref in references:
        if not 0 < len(ref.id) <= MAX_ID_CHARS or "/" in ref.id or not ref.id.isprintable():
            raise ReleaseError(f"reference id {ref.id[:MAX_ID_CHARS]!r} (of {ref.source!r}): ids are 1 to "
                               f"{MAX_ID_CHARS} printable characters without '/'")
        if ref.id in seen or holds(parents, ref.id):
            raise ReleaseError(f"reference id {ref.id!r} (of {ref.source!r}) is listed twice: a release holds each "
                               "reference once")
        seen.add(ref.id)


def _remove_written(store: ObjectStore, name: str, written: Sequence[str], publication: Publication) -> None:
    """After a failure, the keys this publisher wrote under the name, its manifest first if it got
    that far; nothing if its lease no longer holds the name, as they may be another publisher's
    now. If the store is gone, they stay, invisible anyway without a manifest; their lease
    expires, and `release delete` or the next publication of the name removes them then."""
    with contextlib.suppress(StoreError):
        if not written or not publication.holds():
            return
        manifest = release_key(name, MANIFEST_FILE)
        if manifest in written:
            store.remove_keys([manifest])
        store.remove_keys([key for key in written if key != manifest])


def _check_free(store: ObjectStore, name: str) -> None:
    if store.exists(release_key(name, MANIFEST_FILE)):
        raise ReleaseExists(f"release {name!r} already exists; releases are immutable, choose another name")


def _check_sources(store: ObjectStore, name: str, sources: Sequence[str], as_read: Sequence[Manifest] = ()) -> None:
    """The releases `name` is made from are still published, as they were read: deleting one removes
    the memories only it listed, which `name` lists too (a deletion waits for a running publication,
    but not for the work a publisher does before it holds its lease), and one published anew under
    its name meanwhile holds other references than those `name` was made from."""
    gone = [source for source in sources if not store.exists(release_key(source, MANIFEST_FILE))]
    if gone:
        raise ReleaseError(f"release {gone[0]!r}, which {name!r} is made from, was deleted while {name!r} was being "
                           "prepared, with memories it may list; nothing was published")
    for read in as_read:
        try:
            raw = store.get_bytes(release_key(read.name, MANIFEST_FILE)).decode()
            now = dataclasses.replace(Manifest.from_json(raw), name=read.name)  # as `Release.open` names it
        except (ObjectNotFound, ReleaseError):
            now = None
        if now != read:
            raise ReleaseError(f"release {read.name!r}, which {name!r} is made from, was deleted and published anew "
                               f"while {name!r} was being prepared: nothing was published; run it again")


def _check_files(store: ObjectStore, name: str, files: dict[str, dict], publication: Publication) -> None:
    """The lease has not lapsed, and it and every file the manifest will list are still there: a
    publisher that took the name over once the lease expired (the process was stopped too long)
    removed them as leftovers."""
    publication.check_held()
    present = set(store.list_keys(release_key(name, "")))
    missing = [file for file in files if release_key(name, file) not in present]
    if missing or publication.lease.key not in present:
        raise ReleaseError(f"files of release {name!r} were deleted while it was being published "
                           f"({', '.join(missing) or 'its lease'}); nothing was published: publish it again")


def _publish(store, name, model, codec, references, embed, embedder_name, memory_codec, provenance,
             parent_index, parent_rows, parent, batch_size, progress, log, on_encoded, index_kind,
             before_manifest, check_held, written: list[str]) -> Manifest:
    """Writes the release. Before each file, `check_held` raises if the lease lapsed: the name may
    be another publisher's since, with files of the same names. `written` gets each key under the
    name before it is written (one cut short may have landed)."""
    files: dict[str, dict] = {}

    def put_file(file: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """A file written here, streamed up: weights, an index and a table may each be gigabytes."""
        check_held()
        written.append(release_key(name, file))
        store.put_file(release_key(name, file), path, content_type)
        files[file] = {"sha256": sha256_of_file(path), "bytes": path.stat().st_size}

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, Path(tmp), codec.tokenizer)
        for file in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
            put_file(f"model/{file}", Path(tmp) / file)
    if isinstance(memory_codec, VQCodec):
        with tempfile.TemporaryDirectory() as tmp:
            memory_codec.save(Path(tmp) / CODEC_FILE)
            put_file(CODEC_FILE, Path(tmp) / CODEC_FILE)

    bank = bank_id(weights_digest(model), memory_codec.fingerprint(), FORMAT_VERSION)
    prefix = codec.reference_prefix(model.config)
    new_rows: list[dict] = []  # the parent's are read again where needed (`all_rows`), never held

    def all_rows() -> Iterator[dict]:
        return itertools.chain(parent_rows(), new_rows)

    bar = tqdm(total=len(references), desc=f"memory bank {name}", unit="ref", disable=not progress or not references,
               file=sys.stderr)
    # One batch uploads while the next is encoded; a failed upload raises before the manifest. A row
    # records the blob the bank holds once its upload is done: another release's, where one was there.
    shape = model.config.memory_shape
    uploading: list[tuple[Reference, str, Future]] = []

    def uploaded() -> None:
        for ref, key, future in uploading:
            held = future.result()
            new_rows.append({"id": ref.id, "text": ref.text, "source": ref.source, "memory_key": key,
                             "memory_bytes": len(held), "memory_sha256": sha256(held)})

    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(references), batch_size):
            part = references[start : start + batch_size]
            with torch.inference_mode():
                memories = encode_references(model, [list(r.tokens) for r in part], prefix)
            blobs = [encode_memory(m, memory_codec, model.config.ref_len) for m in memories]
            uploaded()
            uploading = [(ref, key, pool.submit(_store_memory, store, key, blob, memory_codec, shape))
                         for ref, blob in zip(part, blobs, strict=True) for key in [memory_key(bank, ref.id)]]
            bar.update(len(part))
            if on_encoded is not None:
                on_encoded(start + len(part), len(references))
        uploaded()
    bar.close()

    if references or parent_index is None:  # a derived release that only removes references embeds nothing
        log(f"embedding {len(references)} references with {embedder_name}")
        vectors = embed([r.text for r in references])
    if parent_index is not None:
        index = VectorIndex.from_bytes(parent_index.to_bytes(), parent_index.ids)
        if references:
            index.add(vectors, [r.id for r in references])
    else:
        kind = None if index_kind == "auto" else index_kind
        index = VectorIndex.build(vectors, [r.id for r in references], kind=kind)
    count = total_bytes = 0
    for rid, row in itertools.zip_longest(index.iter_ids(), all_rows()):  # the parent's rows: one pass of two
        if row is None or rid != row["id"]:
            raise RuntimeError("index rows and reference table are out of order")
        count, total_bytes = count + 1, total_bytes + row.get("memory_bytes", 0)

    def exact_vectors():
        log(f"embedding all {count} references again with {embedder_name}: the index holds approximations")
        return embed([r["text"] for r in all_rows()])
    was = index.kind
    index = index.fitted(index_kind, exact_vectors=exact_vectors)
    if index.kind != was:
        log(f"index: {index.kind} for {count} references (was {was}; index kind {index_kind!r})")
    with tempfile.TemporaryDirectory() as tmp:  # written to disk and streamed up: each is gigabytes at scale
        index.write(Path(tmp) / INDEX_FILE)
        put_file(INDEX_FILE, Path(tmp) / INDEX_FILE)
        table_rows = 0
        with open(Path(tmp) / REFERENCES_FILE, "w", encoding="utf-8") as table:
            def writing() -> Iterator[dict]:  # the table, written as `memory_ids.npy` reads it: the second pass
                nonlocal table_rows
                for row in all_rows():
                    table.write(json.dumps(row, ensure_ascii=False) + "\n")
                    table_rows += 1
                    yield row
            rows = writing()
            has_ids = write_memory_ids(rows, bank, Path(tmp) / MEMORY_IDS_FILE)
            collections.deque(rows, maxlen=0)  # the rest of the table, where a key apart ended that early
        if table_rows != count:
            raise RuntimeError(f"the parent's rows changed between two readings ({count} rows, then {table_rows}): "
                               "nothing was published")
        put_file(REFERENCES_FILE, Path(tmp) / REFERENCES_FILE, "application/x-ndjson")
        if has_ids:
            put_file(MEMORY_IDS_FILE, Path(tmp) / MEMORY_IDS_FILE)

    manifest = Manifest(
        name=name, created=datetime.now(UTC).isoformat(timespec="seconds"), files=files,
        conventions=conventions(model, codec, memory_codec),
        memory_bank={"bank": bank, "key_scheme": "memories/<bank>/<id[:2]>/<id>", "count": count,
                     "bytes": total_bytes, "codec": memory_codec.name, "format_version": FORMAT_VERSION},
        index={"embedder": embedder_name, "dim": int(index.index.d), "type": type(index.index).__name__,
               "count": len(index.ids), "kind": index.kind, "choice": index_kind},
        provenance=provenance, parent=parent,
    )
    before_manifest(files)
    written.append(release_key(name, MANIFEST_FILE))
    store.put_bytes(release_key(name, MANIFEST_FILE), manifest.to_json().encode(), "application/json")
    return manifest
