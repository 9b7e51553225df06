"""The vector index over reference embeddings (FAISS, inner product on unit vectors = cosine).

The kind follows the knowledge base's size, so that queries stay fast and the index fits one
text-service replica's RAM:

- below `HNSW_THRESHOLD` vectors, an exact flat index;
- below `IVFPQ_THRESHOLD`, an HNSW graph over the full vectors (1.5 KiB a vector at 384 dims, with
  the graph: about 17 GB at 10^7);
- from there, IVF-PQ: an inverted file of `nlist` lists (about 4·sqrt(N), a power of two) whose
  vectors are product-quantised to `dim / 8` bytes each (48 B at 384 dims, 56 B with its id: about
  6 GB at 10^8), searched over `IVF_NPROBE` lists. It is trained on a sample of at most 64 vectors
  a list. Its vectors are approximations, so `vectors_of` returns them decoded; removing references
  copies the kept codes as they are, without decoding or training again.

A release may instead keep one kind whatever its size (`memory3 train/kb add --index-kind`); the
choice is stored in its manifest and followed by the releases derived from it. Under "auto", a
derived release that grows or shrinks across a threshold gets the index of its new size, rebuilt
from the stored vectors, except that an IVF-PQ index stays one: its vectors are approximations, and
an exact index rebuilt from them would silently lose recall (`--index-kind flat` or `hnsw` on
`kb add` re-embeds the texts instead).

The index maps FAISS row numbers to reference ids through the row order of the references table it
was built with; it is stored with `faiss.serialize_index` (bytes, no pickle), `nprobe` included.
The ids are held as one numpy array of their UTF-8 bytes, as wide as the longest (`ids`), not as a
list of str: `kb add`/`kb remove` hold a whole release's, and a list took ~90 bytes a 32-character
id (10^8 ids: 9 GB) where the array takes 32. Every row is as wide as the longest id, so one long id
widens them all (ids are at most 128 characters). What leaves the module (`search`, `iter_ids`) is str.

A shard of a stored index (`read_shard`) is taken from the file mapped into memory, not read: only the
shard's rows are copied out, so it needs the memory of the shard, not of the whole index (for HNSW,
whose graph FAISS reads whole, the graph's too while the shard's is built).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HNSW_THRESHOLD = 200_000
IVFPQ_THRESHOLD = 5_000_000
# Graph breadth when building and searching an HNSW index. On the questions of `memory3 bench index`
# over 20,000 references, FAISS's defaults (40, 16) found the question's own reference among the 5
# best for 87% of questions where the exact index found it for 99.7%; 100 and 256 found it for 98%,
# at 0.46 ms a query. At 60,000 these give 0.938 against exact 0.972 (bench/results/index.json).
HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 128, 256
IVF_NPROBE = 128  # lists an IVF-PQ search visits (bench/results/index.json)
IVF_TRAIN_PER_LIST = 64  # sample vectors per list to train on (FAISS asks for at least 39)
IVF_MIN_LISTS, IVF_MIN_TRAIN_PER_LIST = 16, 39  # FAISS warns below 39 training vectors a list
IVFPQ_MIN_VECTORS = IVF_MIN_LISTS * IVF_MIN_TRAIN_PER_LIST
KINDS = ("flat", "hnsw", "ivfpq")
INDEX_CHOICES = ("auto", *KINDS)  # what a release may ask for: "auto" follows the size
_ID_PART = 1 << 18  # ids turned into bytes at a time: their Python objects never pile up


def kind_for(count: int) -> str:
    return "flat" if count < HNSW_THRESHOLD else "hnsw" if count < IVFPQ_THRESHOLD else "ivfpq"


def ivf_lists(count: int) -> int:
    """About 4·sqrt(N) lists, a power of two in [16, 65536], and no more than N vectors train well."""
    wanted = 2 ** round(np.log2(4 * np.sqrt(max(count, 1))))
    trainable = 2 ** int(np.log2(max(count // IVF_MIN_TRAIN_PER_LIST, 1)))
    return int(min(65536, max(IVF_MIN_LISTS, min(wanted, trainable))))


@dataclass(frozen=True)
class IndexShard:
    """Shard `index` of `count`: the rows whose number is `index` modulo `count`, so that every shard
    of a release holds about as many references, whatever their order."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"index shard {self.index}/{self.count}: give I/N with 0 <= I < N, e.g. 0/4")

    @classmethod
    def parse(cls, text: str) -> IndexShard:
        """"I/N", as `serve text --index-shard` takes it."""
        index, sep, count = text.partition("/")
        with contextlib.suppress(ValueError):
            if sep:
                return cls(int(index), int(count))
        raise ValueError(f"index shard {text!r}: give I/N with 0 <= I < N, e.g. 0/4")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, row: int) -> bool:
        """Whether row `row` of the release's reference table is in this shard."""
        return row % self.count == self.index


def check_index_choice(choice: str, count: int | None = None) -> None:
    """A ValueError that says what to choose, for an unknown kind or an IVF-PQ index of too few
    vectors (checked before hours of work that would end in it, when `count` is known)."""
    if choice not in INDEX_CHOICES:
        raise ValueError(f"unknown index kind {choice!r}; choose one of {', '.join(INDEX_CHOICES)}")
    if choice == "ivfpq" and count is not None and count < IVFPQ_MIN_VECTORS:
        raise ValueError(f"an IVF-PQ index trains on at least {IVFPQ_MIN_VECTORS} vectors and this one would hold "
                         f"{count}: choose flat or hnsw (or auto) for a knowledge base this small")


def id_array(ids: Iterable[str] | np.ndarray) -> np.ndarray:
    """`ids` in their order as numpy bytes (UTF-8, as wide as the longest; an array of them is taken
    as it is), read once a part at a time: a whole release's never lives as Python objects. An id
    is printable, so none ends in the NUL that numpy bytes drop."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "S":
        return ids
    ids, parts = iter(ids), []
    while part := list(itertools.islice(ids, _ID_PART)):
        parts.append(np.array([rid.encode() for rid in part], dtype=np.bytes_))  # (n,) S<longest of the part>
    return np.concatenate(parts) if parts else np.zeros(0, dtype="S1")  # (N,) S<longest>


def by_rank(hit: tuple[str, float]) -> tuple[float, str]:
    """The order of (id, score) hits: best score first, equal scores by id. Exact ties are real: texts
    that differ only in case embed alike (the embedder is uncased) and have different ids."""
    return -hit[1], hit[0]


IdsLike = Iterable[str] | np.ndarray  # str ids in row order, or `id_array` of them


class VectorIndex:
    def __init__(self, index, ids: IdsLike) -> None:
        self.index = index
        self.ids = id_array(ids)  # (N,) S<longest>: row -> id (`iter_ids`, `id_at` give str)
        if index.ntotal != len(self.ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(self.ids)} ids were given")

    @classmethod
    def build(cls, vectors: np.ndarray, ids: IdsLike, *, kind: str | None = None, nprobe: int = IVF_NPROBE,
              nlist: int | None = None, seed: int = 0) -> VectorIndex:
        """An index of `vectors` (unit rows, (N, dim)) of the kind their number calls for, or `kind`
        (IVF-PQ with `ivf_lists(N)` lists unless `nlist` is given)."""
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        count, dim = vectors.shape
        kind = kind or kind_for(count)
        check_index_choice(kind)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
        elif kind == "ivfpq":
            if dim % 8:
                raise ValueError(f"an IVF-PQ index needs a dimension divisible by 8, got {dim}")
            nlist = nlist or ivf_lists(count)
            if count < IVF_MIN_TRAIN_PER_LIST * nlist:
                raise ValueError(f"an IVF-PQ index of {nlist} lists trains on at least "
                                 f"{IVF_MIN_TRAIN_PER_LIST * nlist} vectors, got {count}")
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, dim // 8, 8, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(seed).choice(count, min(count, IVF_TRAIN_PER_LIST * nlist), replace=False)
            index.train(vectors[np.sort(sample)])
            index.nprobe = min(nprobe, nlist)
        else:
            raise ValueError(f"index kind {kind!r} is a choice, not a kind; choose one of {', '.join(KINDS)}")
        index.add(vectors)
        return cls(index, ids)

    @property
    def kind(self) -> str:
        import faiss

        if isinstance(self.index, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(self.index, faiss.IndexIVFPQ):
            return "ivfpq"
        if isinstance(self.index, faiss.IndexFlat):
            return "flat"
        raise ValueError(f"an index of type {type(self.index).__name__} is none of {', '.join(KINDS)}")

    def kind_wanted(self, choice: str = "auto") -> str:
        """The kind this index should be under `choice`: "auto" follows its size, but an IVF-PQ
        index stays one (see the module's docstring)."""
        check_index_choice(choice, len(self.ids))
        if choice != "auto":
            return choice
        return "ivfpq" if self.kind == "ivfpq" else kind_for(len(self.ids))

    def fitted(self, choice: str = "auto", *, exact_vectors: Callable[[], np.ndarray] | None = None) -> VectorIndex:
        """This index if it is of the kind `choice` wants, or a new one of that kind, built from the
        stored vectors, or from `exact_vectors()` ((N, dim), in `ids` order) when they are quantised."""
        kind = self.kind_wanted(choice)
        if kind == self.kind:
            return self
        if self.kind != "ivfpq":
            vectors = self.index.reconstruct_n(0, self.index.ntotal)  # (N, dim)
        elif exact_vectors is not None:
            vectors = exact_vectors()
        else:
            raise ValueError(f"this IVF-PQ index stores approximations of its vectors, and a {kind} index built "
                             "from them would lose recall: re-embed the references (kb add --index-kind does)")
        return VectorIndex.build(vectors, self.ids, kind=kind)

    def id_at(self, row: int) -> str:
        return self.ids[row].decode()

    def iter_ids(self) -> Iterator[str]:
        """The ids as str, in row order, made one at a time (a list of them is what `ids` spares)."""
        return (rid.decode() for rid in self.ids)

    def add(self, vectors: np.ndarray, ids: IdsLike) -> None:
        """`vectors` ((n, dim) unit rows) as the last rows, with `ids`. The id array is copied once,
        wider if an added id is longer than any held."""
        added = id_array(ids)  # (n,)
        if len(added) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(added)} ids were given")
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.ids = np.concatenate([self.ids, added])  # (N + n,)

    def vectors_of(self, ids: IdsLike) -> np.ndarray:
        """The stored vectors of `ids`, in that order: (len(ids), dim)."""
        rows = self._rows_of(id_array(ids))  # (K,)
        ivf = self._ivf()
        if ivf is not None:
            ivf.make_direct_map()  # row -> (list, offset); a no-op once made
        return self.index.reconstruct_batch(rows).reshape(len(rows), self.index.d)

    def _rows_of(self, asked: np.ndarray) -> np.ndarray:
        """The rows of the ids `asked` ((K,) bytes), in that order; KeyError naming the first the index
        lacks. By binary search of the ids in sorted order (an (N,) int64 argsort, 8 bytes an id): a
        dict of them took ~100 bytes an id, 10 GB at 10^8."""
        if not len(self.ids):
            found = np.zeros(len(asked), dtype=bool)
            rows = np.zeros(len(asked), dtype=np.int64)
        else:
            order = np.argsort(self.ids, kind="stable")  # (N,)
            at = np.minimum(np.searchsorted(self.ids, asked, sorter=order), len(order) - 1)  # (K,)
            rows = order[at]  # (K,)
            found = self.ids[rows] == asked  # (K,)
        if not found.all():
            raise KeyError(f"the index has no vector for reference {asked[np.argmin(found)].decode()!r}")
        return rows.astype(np.int64, copy=False)

    def without(self, drop: Collection[str] | np.ndarray) -> VectorIndex:
        """A new index of every vector but those of `drop`, in the same order (see `_keeping`)."""
        return self._keeping(np.flatnonzero(~in_sorted(self.ids, np.sort(id_array(drop)))))

    def shard(self, shard: IndexShard) -> VectorIndex:
        """A new index of this one's rows in `shard`, in the same order (see `_keeping`)."""
        if shard.count == 1:
            return self
        return self._keeping(np.arange(shard.index, len(self.ids), shard.count, dtype=np.int64))

    def _keeping(self, rows: np.ndarray, ids: IdsLike | None = None) -> VectorIndex:
        """A new index of the rows `rows` (increasing) only, in memory of its own, with `ids` (default:
        theirs here): for IVF-PQ a copy of their codes, otherwise built from a copy of their vectors (an
        HNSW graph cannot remove a node, so a shard's graph is built again). Only the kept rows are
        copied, never the whole index."""
        ids = self.ids[rows] if ids is None else id_array(ids)  # (N_kept,)
        if self._ivf() is not None:
            return VectorIndex(self._ivf_keeping(rows), ids)
        return VectorIndex.build(self._stored_vectors()[rows], ids, kind=self.kind)  # (N_kept, dim)

    def _stored_vectors(self) -> np.ndarray:
        """The full vectors a flat or HNSW index searches, (N, dim) float32: a read-only view of the
        index's own memory (or of its mapped file), valid while the index lives."""
        import faiss

        flat = faiss.downcast_index(self.index.storage) if isinstance(self.index, faiss.IndexHNSW) else self.index
        if flat.ntotal == 0:
            return np.empty((0, flat.d), dtype=np.float32)
        view = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
        view.flags.writeable = False  # a mapped file is read-only: writing would crash the process
        return view

    def _ivf(self):
        import faiss

        return self.index if isinstance(self.index, faiss.IndexIVF) else None

    def _empty_ivf(self):
        """A copy of this IVF index's trained quantizers holding no rows, in memory of its own. Its lists
        are set aside while `faiss.clone_index` copies it: the copy would hold every list only to empty
        them, and share those of a mapped index (emptying them then aborts the process). The index must
        not be searched meanwhile."""
        import faiss

        index = self.index
        lists, owned = index.invlists, index.own_invlists
        no_lists = faiss.ArrayInvertedLists(index.nlist, index.code_size)
        index.own_invlists = False  # else replace_invlists frees them
        index.replace_invlists(no_lists, False)
        try:
            empty = faiss.clone_index(index)
        finally:
            index.replace_invlists(lists, owned)
        empty.reset()
        return empty

    def _ivf_keeping(self, keep: np.ndarray):
        """A copy of this IVF index (its trained quantizers) holding only the rows `keep`, renumbered
        0.. in their order, each with its own list and code."""
        import faiss

        old = self.index
        new = self._empty_ivf()
        new.make_direct_map(False)
        renumber = np.full(old.ntotal, -1, dtype=np.int64)
        renumber[keep] = np.arange(len(keep), dtype=np.int64)
        lists, code_size = old.invlists, old.invlists.code_size
        for list_no in range(old.nlist):
            size = lists.list_size(list_no)
            if size == 0:
                continue
            rows = faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy()
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * code_size).copy().reshape(size, code_size)
            kept = renumber[rows] >= 0
            if kept.any():
                new_rows = np.ascontiguousarray(renumber[rows[kept]])
                new_codes = np.ascontiguousarray(codes[kept])
                new.invlists.add_entries(list_no, int(kept.sum()), faiss.swig_ptr(new_rows), faiss.swig_ptr(new_codes))
        new.ntotal = len(keep)
        return new

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """(Q, dim) unit vectors -> per query, up to k (reference id, cosine) best first; equal
        scores by id (`by_rank`), as shards' answers are merged, so that both agree."""
        if len(self.ids) == 0:
            return [[] for _ in range(len(queries))]
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self.ids)))
        return [sorted(((self.id_at(r), float(s)) for r, s in zip(row, score, strict=True) if r >= 0), key=by_rank)
                for row, score in zip(rows, scores, strict=True)]

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    def write(self, path: Path) -> None:
        """Store the index at `path`, as `to_bytes` gives it."""
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, ids: IdsLike) -> VectorIndex:
        import faiss

        return cls(_searched_widely(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))), ids)

    @classmethod
    def read(cls, path: Path, ids: IdsLike) -> VectorIndex:
        """The index stored at `path` (`to_bytes`'s format), read once: `from_bytes` holds the file's
        bytes and FAISS copies them again before it builds the index, three times its size in all."""
        import faiss

        return cls(_searched_widely(faiss.read_index(str(path))), ids)

    @classmethod
    def read_shard(cls, path: Path, ids: IdsLike, shard: IndexShard) -> VectorIndex:
        """Shard `shard` of the index stored at `path` (`ids`: the ids of the shard's rows, which alone
        are needed), the same as `read(path, all_ids).shard(shard)` but in the memory of the shard
        alone. The file is mapped (FAISS's IO_FLAG_MMAP_IFC), not read: the pages touched stay the
        file's, which the system may drop, and only the shard's rows are copied out. The mapped index
        never leaves here: FAISS aborts the process on an attempt to change one."""
        import faiss

        if shard.count == 1:
            return cls.read(path, ids)
        ids = id_array(ids)  # (N_shard,)
        whole = cls.__new__(cls)  # without the ids of the other shards' rows
        whole.index, whole.ids = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC), id_array(())
        rows = np.arange(shard.index, whole.index.ntotal, shard.count, dtype=np.int64)
        if len(rows) != len(ids):
            raise ValueError(f"shard {shard} of an index of {whole.index.ntotal} vectors holds {len(rows)}, but "
                             f"{len(ids)} ids were given")
        return whole._keeping(rows, ids)


def in_sorted(ids: np.ndarray, sorted_ids: np.ndarray, part: int = 1 << 20) -> np.ndarray:
    """Whether each of `ids` ((N,) bytes) is one of `sorted_ids` ((D,) bytes, sorted): each
    binary-searched, `part` at a time, so that what is made beside the (N,) answer is the size of a
    part (np.isin would sort a copy of all N ids with theirs: gigabytes at a table's 10^8)."""
    held = np.zeros(len(ids), dtype=bool)  # (N,)
    if not len(sorted_ids):
        return held
    for start in range(0, len(ids), part):
        chunk = ids[start:start + part]  # (p,)
        at = np.minimum(np.searchsorted(sorted_ids, chunk), len(sorted_ids) - 1)  # (p,)
        held[start:start + part] = sorted_ids[at] == chunk
    return held


def _searched_widely(index):
    """`index` as read, an HNSW graph stored with a narrower search (e.g. FAISS's default) searched
    with `HNSW_EF_SEARCH`."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(index.hnsw.efSearch, HNSW_EF_SEARCH)
    return index
