"""VectorIndex: the kind that fits the size, the kept references' own vectors after a removal (flat,
HNSW or IVF-PQ), and the search breadth a stored index is given."""

import faiss
import numpy as np
import pytest

from memory3.services.retrieval.index import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_THRESHOLD,
    IVFPQ_THRESHOLD,
    VectorIndex,
    ivf_lists,
    kind_for,
)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_an_index_without_some_references_keeps_each_kept_vector_with_its_id(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"ref-{i}" for i in range(50)]
    if kind == "flat":
        index = VectorIndex.build(vectors, ids)
    else:  # what build makes past HNSW_THRESHOLD vectors
        graph = faiss.IndexHNSWFlat(16, 32, faiss.METRIC_INNER_PRODUCT)
        graph.add(vectors)
        index = VectorIndex(graph, ids)
    drop = {"ref-0", "ref-7", "ref-49"}
    smaller = index.without(drop)
    kept = [i for i in range(50) if ids[i] not in drop]
    assert smaller.ids == [ids[i] for i in kept] and smaller.index.ntotal == 47
    np.testing.assert_allclose(smaller.index.reconstruct_n(0, 47), vectors[kept], atol=1e-6)
    assert [hits[0][0] for hits in smaller.search(vectors[kept], 1)] == smaller.ids
    assert len(index.ids) == 50  # the original is left as it was


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_the_vectors_of_some_references_are_theirs_in_the_order_asked(kind):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((20, 8)).astype(np.float32)
    ids = [f"ref-{i}" for i in range(20)]
    graph = faiss.IndexFlatIP(8) if kind == "flat" else faiss.IndexHNSWFlat(8, 32, faiss.METRIC_INNER_PRODUCT)
    graph.add(vectors)
    index = VectorIndex(graph, ids)
    np.testing.assert_allclose(index.vectors_of(["ref-9", "ref-2", "ref-19"]), vectors[[9, 2, 19]], atol=1e-6)
    assert index.vectors_of([]).shape == (0, 8)
    with pytest.raises(KeyError, match="no vector for reference 'ref-20'"):
        index.vectors_of(["ref-1", "ref-20"])


def _clustered(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    vectors = centers[rng.integers(0, 64, count)] + 0.5 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_the_kind_of_index_follows_the_number_of_vectors():
    assert [kind_for(n) for n in (1, HNSW_THRESHOLD - 1, HNSW_THRESHOLD, IVFPQ_THRESHOLD - 1, IVFPQ_THRESHOLD)] == \
        ["flat", "flat", "hnsw", "hnsw", "ivfpq"]
    assert [ivf_lists(n) for n in (1, 20_000, 5_000_000, 10**8, 10**10)] == [16, 512, 8192, 32768, 65536]


def test_an_ivfpq_index_keeps_codes_exactly_when_references_are_removed_and_survives_serialisation():
    vectors = _clustered(20_000, 32)
    ids = [f"ref-{i}" for i in range(20_000)]
    index = VectorIndex.build(vectors, ids, kind="ivfpq")
    assert isinstance(index.index, faiss.IndexIVFPQ)
    assert (index.index.nlist, index.index.nprobe, index.index.pq.M) == (512, 128, 4)
    # Decoded vectors are approximations of the originals, in the order asked.
    decoded = index.vectors_of(["ref-7", "ref-3"])
    assert decoded.shape == (2, 32) and np.all(np.sum(decoded * vectors[[7, 3]], axis=1) > 0.8)
    drop = {f"ref-{i}" for i in range(0, 20_000, 3)}
    smaller = index.without(drop)
    kept = [i for i in range(20_000) if ids[i] not in drop]
    assert smaller.ids == [ids[i] for i in kept] and smaller.index.ntotal == len(kept)
    # Each kept row is its own code, moved and renumbered, not re-encoded.
    np.testing.assert_array_equal(smaller.vectors_of([ids[i] for i in kept[:500]]),
                                  index.vectors_of([ids[i] for i in kept[:500]]))
    hits = smaller.search(vectors[kept[:200]], 5)
    assert np.mean([ids[i] in {rid for rid, _ in row} for i, row in zip(kept, hits, strict=False)]) > 0.9
    assert all(rid not in drop for row in hits for rid, _ in row)
    loaded = VectorIndex.from_bytes(smaller.to_bytes(), smaller.ids)
    assert loaded.index.nprobe == 128 and loaded.search(vectors[kept[:3]], 1) == smaller.search(vectors[kept[:3]], 1)
    loaded.add(vectors[:2], ["new-0", "new-1"])
    assert loaded.search(vectors[:1], 1)[0][0][0] in ("new-0", "ref-0")


def test_an_ivfpq_index_says_what_it_needs():
    with pytest.raises(ValueError, match="of 256 lists trains on at least 9984 vectors, got 5000"):
        VectorIndex.build(_clustered(5000, 32), [str(i) for i in range(5000)], kind="ivfpq")
    with pytest.raises(ValueError, match="dimension divisible by 8, got 30"):
        VectorIndex.build(_clustered(100, 30), [str(i) for i in range(100)], kind="ivfpq")
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        VectorIndex.build(_clustered(100, 32), [str(i) for i in range(100)], kind="lsh")


def test_an_hnsw_graph_stored_with_a_narrow_search_is_searched_wider():
    vectors = _clustered(500, 16)
    graph = faiss.IndexHNSWFlat(16, 32, faiss.METRIC_INNER_PRODUCT)
    graph.add(vectors)
    assert graph.hnsw.efSearch == 16  # FAISS's default, as older releases stored it
    loaded = VectorIndex.from_bytes(VectorIndex(graph, [str(i) for i in range(500)]).to_bytes(),
                                    [str(i) for i in range(500)])
    assert loaded.index.hnsw.efSearch == HNSW_EF_SEARCH
    built = VectorIndex.build(vectors, [str(i) for i in range(500)], kind="hnsw")
    assert (built.index.hnsw.efConstruction, built.index.hnsw.efSearch) == (HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH)
