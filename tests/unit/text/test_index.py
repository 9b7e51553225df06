"""VectorIndex: the kind that fits the size or the one chosen, the kept references' own vectors after a
removal (flat, HNSW or IVF-PQ), and the search breadth a stored index is given."""

import faiss
import numpy as np
import pytest

from memory3.services.retrieval import index as index_module
from memory3.services.retrieval.index import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_THRESHOLD,
    IVFPQ_MIN_VECTORS,
    IVFPQ_THRESHOLD,
    IndexShard,
    VectorIndex,
    check_index_choice,
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
    assert ids_of(smaller) == [ids[i] for i in kept] and smaller.index.ntotal == 47
    np.testing.assert_allclose(smaller.index.reconstruct_n(0, 47), vectors[kept], atol=1e-6)
    assert [hits[0][0] for hits in smaller.search(vectors[kept], 1)] == ids_of(smaller)
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


def ids_of(index: VectorIndex) -> list[str]:
    return list(index.iter_ids())


def _clustered(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    vectors = centers[rng.integers(0, 64, count)] + 0.5 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_the_kind_of_index_follows_the_number_of_vectors():
    assert [kind_for(n) for n in (1, HNSW_THRESHOLD - 1, HNSW_THRESHOLD, IVFPQ_THRESHOLD - 1, IVFPQ_THRESHOLD)] == \
        ["flat", "flat", "hnsw", "hnsw", "ivfpq"]
    assert [ivf_lists(n) for n in (1, 20_000, 5_000_000, 10**8, 10**10)] == [16, 512, 8192, 32768, 65536]
    # Fewer lists than 4·sqrt(N) where N would not give each 39 vectors to train on.
    assert [ivf_lists(n) for n in (IVFPQ_MIN_VECTORS, 5000, 9983, 9984)] == [16, 128, 128, 256]


def test_an_index_grown_or_shrunk_across_a_threshold_is_rebuilt_as_its_size_calls_for(monkeypatch):
    monkeypatch.setattr(index_module, "HNSW_THRESHOLD", 40)
    vectors = _clustered(60, 16)
    ids = [f"ref-{i}" for i in range(60)]
    small = VectorIndex.build(vectors[:30], ids[:30])
    assert small.kind == "flat" and small.fitted() is small
    small.add(vectors[30:], ids[30:])  # as kb add and kb merge grow a parent's index
    grown = small.fitted()
    assert grown.kind == "hnsw" and isinstance(grown.index, faiss.IndexHNSWFlat) and ids_of(grown) == ids
    assert (grown.index.hnsw.efConstruction, grown.index.hnsw.efSearch) == (HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH)
    np.testing.assert_allclose(grown.vectors_of(ids), vectors, atol=1e-6)
    shrunk = grown.without(set(ids[:25]))
    assert shrunk.kind == "hnsw"  # a removal keeps the kind; fitting it is the publisher's
    assert shrunk.fitted().kind == "flat" and ids_of(shrunk.fitted()) == ids[25:]
    # A kind chosen is kept whatever the size.
    assert shrunk.fitted("hnsw") is shrunk and grown.fitted("flat").kind == "flat"


def test_an_ivfpq_index_stays_one_unless_the_exact_vectors_are_given_again(monkeypatch):
    vectors = _clustered(1000, 32)
    ids = [f"ref-{i}" for i in range(1000)]
    quantised = VectorIndex.build(vectors, ids, kind="ivfpq")
    assert quantised.kind == "ivfpq" and quantised.kind_wanted() == "ivfpq"  # under auto, below every threshold
    assert quantised.fitted() is quantised
    with pytest.raises(ValueError, match="approximations of its vectors.*re-embed"):
        quantised.fitted("flat")
    asked = []
    exact = quantised.fitted("flat", exact_vectors=lambda: asked.append(1) or vectors)
    assert asked == [1] and exact.kind == "flat" and ids_of(exact) == ids
    np.testing.assert_array_equal(exact.vectors_of(ids), vectors)
    # A flat or HNSW index is rebuilt from its own vectors, without asking for them.
    assert exact.fitted("ivfpq", exact_vectors=lambda: pytest.fail("asked for vectors")).kind == "ivfpq"


def test_an_index_choice_is_checked_before_the_work_that_would_end_in_it():
    for choice in ("auto", "flat", "hnsw", "ivfpq"):
        check_index_choice(choice, IVFPQ_MIN_VECTORS)
    with pytest.raises(ValueError, match="unknown index kind 'ivf'; choose one of auto, flat, hnsw, ivfpq"):
        check_index_choice("ivf")
    with pytest.raises(ValueError, match=f"at least {IVFPQ_MIN_VECTORS} vectors and this one would hold 623: "
                                         "choose flat or hnsw"):
        check_index_choice("ivfpq", IVFPQ_MIN_VECTORS - 1)


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
    assert ids_of(smaller) == [ids[i] for i in kept] and smaller.index.ntotal == len(kept)
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
        VectorIndex.build(_clustered(5000, 32), [str(i) for i in range(5000)], kind="ivfpq", nlist=256)
    with pytest.raises(ValueError, match="of 16 lists trains on at least 624 vectors, got 600"):
        VectorIndex.build(_clustered(600, 32), [str(i) for i in range(600)], kind="ivfpq")
    with pytest.raises(ValueError, match="dimension divisible by 8, got 30"):
        VectorIndex.build(_clustered(100, 30), [str(i) for i in range(100)], kind="ivfpq")
    with pytest.raises(ValueError, match="unknown index kind 'lsh'; choose one of auto, flat"):
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


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_the_shards_of_an_index_hold_every_nth_row_each_once(kind):
    vectors = _clustered(1000, 32)
    ids = [f"ref-{i}" for i in range(1000)]
    index = VectorIndex.build(vectors, ids, kind=kind)
    shards = [index.shard(IndexShard(i, 3)) for i in range(3)]
    assert [ids_of(s) for s in shards] == [ids[i::3] for i in range(3)]
    assert all(s.kind == kind for s in shards)
    # Each row keeps its own vector (or code).
    np.testing.assert_array_equal(shards[2].vectors_of(ids[2::3][:50]), index.vectors_of(ids[2::3][:50]))
    assert index.shard(IndexShard(0, 1)) is index


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_a_shard_read_from_the_stored_index_is_that_shard_of_the_whole_index(kind, tmp_path):
    vectors = _clustered(1000, 32)
    ids = [f"ref-{i}" for i in range(1000)]
    whole = VectorIndex.build(vectors, ids, kind=kind)
    if kind == "ivfpq":
        whole.vectors_of(ids[:1])  # an IVF index stored with its row map
    whole.write(tmp_path / "index.faiss")
    for i in range(3):
        read = VectorIndex.read_shard(tmp_path / "index.faiss", ids[i::3], IndexShard(i, 3))
        taken = whole.shard(IndexShard(i, 3))
        assert ids_of(read) == ids_of(taken) == ids[i::3] and read.kind == kind
        np.testing.assert_array_equal(read.vectors_of(read.ids), whole.vectors_of(ids_of(read)))
        if kind == "hnsw":  # a graph built again, searched approximately: each vector finds itself
            assert [hits[0][0] for hits in read.search(vectors[i::3], 1)] == ids_of(read)
        else:
            assert read.search(vectors[:100], 5) == taken.search(vectors[:100], 5)
        read.add(vectors[:2], ["new-0", "new-1"])  # its memory is its own, not the stored file's
        assert read.index.ntotal == len(ids[i::3]) + 2
    assert ids_of(VectorIndex.read_shard(tmp_path / "index.faiss", ids, IndexShard(0, 1))) == ids
    with pytest.raises(ValueError, match="holds 334, but 333 ids were given"):
        VectorIndex.read_shard(tmp_path / "index.faiss", ids[1::3], IndexShard(0, 3))


def test_a_shard_is_read_in_the_memory_of_the_shard_alone(tmp_path):
    """A process whose heap may grow by 0.8 of the stored index reads a quarter of it: the file is
    mapped, and only the shard's vectors are copied (reading the whole index as bytes, then a copy
    for FAISS and one of its vectors took three times the index)."""
    import subprocess
    import sys

    count, dim = 100_000, 384
    flat = faiss.IndexFlatIP(dim)
    for start in range(0, count, 10_000):
        flat.add(_clustered(10_000, dim, seed=start))
    path = tmp_path / "index.faiss"
    VectorIndex(flat, [str(i) for i in range(count)]).write(path)
    del flat
    budget = int(0.8 * path.stat().st_size)
    script = f"""
import resource
import faiss  # loaded before the limit: it is on the index's memory, not the library's
from memory3.services.retrieval.index import IndexShard, VectorIndex
ids = [str(i) for i in range({count})]
with open("/proc/self/status") as status:
    heap = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
resource.setrlimit(resource.RLIMIT_DATA, (heap + {budget}, heap + {budget}))
shard = VectorIndex.read_shard({str(path)!r}, ids[1::4], IndexShard(1, 4))
assert list(shard.iter_ids()) == ids[1::4], "not the shard's rows"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(("text", "shard"), [("0/1", IndexShard(0, 1)), ("3/4", IndexShard(3, 4))])
def test_an_index_shard_is_given_as_i_of_n(text, shard):
    assert IndexShard.parse(text) == shard and str(shard) == text


@pytest.mark.parametrize("text", ["4/4", "-1/2", "1/0", "1", "a/b", ""])
def test_an_index_shard_that_is_not_i_of_n_says_what_to_give(text):
    with pytest.raises(ValueError, match=r"give I/N with 0 <= I < N, e\.g\. 0/4"):
        IndexShard.parse(text)


def test_equal_scores_rank_by_id_in_the_whole_index_and_in_merged_shards():
    """Texts that differ only in case embed alike: the whole index gave one of them, the merged shards
    another, which also depended on the order of the decoder's --text-address list."""
    import asyncio

    from memory3.services.text.client import Answer, ShardedTextClient

    vectors = np.zeros((4, 8), dtype=np.float32)
    vectors[:, 0] = 1.0
    vectors[3] = np.eye(8, dtype=np.float32)[1]  # one that is not a tie
    ids = ["d", "b", "c", "a"]
    whole = VectorIndex.build(vectors, ids, kind="flat")
    query = np.eye(8, dtype=np.float32)[:1]
    # The text service searches past k (SEARCH_MARGIN) and keeps the first k: ties inside that margin
    # are cut by id, as the merge cuts them.
    assert [rid for rid, _ in whole.search(query, 4)[0]] == ["b", "c", "d", "a"]

    class Shard:
        def __init__(self, i: int, n: int) -> None:
            self.index, self.i, self.n = whole.shard(IndexShard(i, n)), i, n

        async def answer(self, queries, top_k, include_text):
            hits = [[(rid, score, "") for rid, score in found] for found in self.index.search(query, top_k)]
            return Answer(hits, "r", (self.i, self.n), top_k)

    shards = [Shard(i, 3) for i in range(3)]
    for order in (shards, shards[::-1]):
        merged = asyncio.run(ShardedTextClient(order)._merged([None], 2, False))
        assert [rid for rid, _, _ in merged[0]] == ["b", "c"]


def test_ids_are_held_as_bytes_and_given_back_as_str_whatever_their_characters():
    """The ids were a list of str, ~90 bytes a 32-character id, held whole by `kb add` and `kb
    remove` (10^8 at design scale). Held as bytes, an id must still leave the module as the str it was:
    protobuf and JSON take no numpy scalars."""
    vectors = _clustered(6, 8)
    ids = ["ref-0", "ümlaut", "日本語の参照", "a" * 128, "x", "semi;colon"]
    index = VectorIndex.build(vectors, ids)
    assert index.ids.dtype == "S128" and index.ids.nbytes == len(ids) * 128  # as wide as the longest, in UTF-8
    found = [hits[0][0] for hits in index.search(vectors, 1)]
    assert found == ids and all(type(rid) is str for rid in found)
    assert ids_of(index) == ids and index.id_at(2) == "日本語の参照"
    np.testing.assert_array_equal(index.vectors_of(["日本語の参照", "x"]), vectors[[2, 4]])
    assert ids_of(index.without({"ümlaut", "not-held"})) == [rid for rid in ids if rid != "ümlaut"]
    assert ids_of(index.shard(IndexShard(1, 2))) == ids[1::2]
    assert ids_of(VectorIndex.from_bytes(index.to_bytes(), index.ids)) == ids
    index.add(_clustered(1, 8, seed=1), ["b" * 200])  # wider than any held: the array widens
    assert ids_of(index)[-1] == "b" * 200 and index.search(_clustered(1, 8, seed=1), 1)[0][0][0] == "b" * 200
    with pytest.raises(ValueError, match="2 vectors but 1 ids were given"):
        index.add(_clustered(2, 8), ["c"])


def test_thirty_two_character_ids_take_thirty_two_bytes_each():
    import tracemalloc

    count = 100_000
    ids = [f"{i:032x}" for i in range(count)]
    flat = faiss.IndexFlatIP(4)
    flat.add(np.zeros((count, 4), dtype=np.float32))
    tracemalloc.start()
    try:
        index = VectorIndex(flat, ids)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert index.ids.nbytes == 32 * count and held < 34 * count, f"{held / count:.0f} bytes an id"


def test_the_vectors_of_a_few_ids_are_found_without_a_dict_of_every_id():
    """vectors_of built a dict of every id (~100 bytes an id, 10 GB at 10^8) to find a few (`kb merge`
    copies the vectors of each derived release's added references)."""
    import tracemalloc

    count = 200_000
    flat = faiss.IndexFlatIP(4)
    flat.add(np.arange(4 * count, dtype=np.float32).reshape(count, 4))
    index = VectorIndex(flat, [f"{i:032x}" for i in range(count)])
    asked = [f"{i:032x}" for i in (count - 1, 5, 70_000)]
    tracemalloc.start()
    try:
        got = index.vectors_of(asked)  # (3, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got[:, 0], [4 * (count - 1), 20, 280_000])
    assert peak < 20 * count, f"{peak / count:.0f} bytes an id at the peak"  # an argsort: 8
