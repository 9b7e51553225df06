"""VectorIndex.without: an index of the kept references' own vectors, flat or HNSW."""

import faiss
import numpy as np
import pytest

from memory3.services.retrieval.index import VectorIndex


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
