"""The vector index over reference embeddings (FAISS, inner product on unit vectors = cosine).

Small knowledge bases use an exact flat index; past `HNSW_THRESHOLD` vectors an HNSW graph keeps
queries fast. The index maps FAISS row numbers to reference ids through the row order of the
references table it was built with; it is stored with `faiss.serialize_index` (bytes, no pickle).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

HNSW_THRESHOLD = 200_000


class VectorIndex:
    def __init__(self, index, ids: Sequence[str]) -> None:
        if index.ntotal != len(ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(ids)} ids were given")
        self.index = index
        self.ids = list(ids)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str]) -> VectorIndex:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        index = faiss.IndexFlatIP(dim) if len(vectors) < HNSW_THRESHOLD else faiss.IndexHNSWFlat(
            dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.add(vectors)
        return cls(index, ids)

    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.ids.extend(ids)

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of `ids`, in that order: (len(ids), dim)."""
        row_of = {rid: row for row, rid in enumerate(self.ids)}
        missing = [rid for rid in ids if rid not in row_of]
        if missing:
            raise KeyError(f"the index has no vector for reference {missing[0]!r}")
        rows = np.fromiter((row_of[rid] for rid in ids), dtype=np.int64, count=len(ids))
        return self.index.reconstruct_batch(rows).reshape(len(ids), self.index.d)

    def without(self, drop: Collection[str]) -> VectorIndex:
        """A new index of every vector but those of `drop`, in the same order, rebuilt from the
        stored vectors (an HNSW graph cannot remove a node)."""
        keep = [row for row, rid in enumerate(self.ids) if rid not in drop]
        vectors = self.index.reconstruct_n(0, self.index.ntotal)[keep]  # (N_kept, dim)
        return VectorIndex.build(vectors, [self.ids[row] for row in keep])

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """(Q, dim) unit vectors -> per query, up to k (reference id, cosine) best first."""
        if len(self.ids) == 0:
            return [[] for _ in range(len(queries))]
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self.ids)))
        return [[(self.ids[r], float(s)) for r, s in zip(row, score, strict=True) if r >= 0]
                for row, score in zip(rows, scores, strict=True)]

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, ids: Sequence[str]) -> VectorIndex:
        import faiss

        return cls(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), ids)
