"""Index benchmark: how often each kind of vector index finds a question's own reference.

The knowledge base is the trainer's synthetic world (`World`): N entities, each with its reference
document ("Fafior Mothair (person): profession jeweller; birthplace Sunwick; ..."), all alike in
form and told apart by names, a hard case for an approximate index. Queries are questions about
some of them (`qa_prompt`), embedded as the text service embeds a chunk. Each kind of index holds
the same embedded documents: flat (exact), HNSW, and IVF-PQ with the parameters `VectorIndex.build`
gives N (its lists, 8-bit codes of dim / 8 bytes), searched with several `nprobe`.

Figures per kind: hit@1 and hit@5 (the question's own reference first, or among the 5 a chunk
retrieves), overlap@5 with the exact index's 5, bytes per vector of the serialized index, query
time per query in a batch of all the questions (the median of 5 searches after an untimed one), and
build time. Ratios against flat come from the same run.

Sharded (`sharded`, per kind): the index split as `serve text --index-shard I/N` splits it, each
shard searched alone (the N text services search at once, so a query waits for the slowest), and
the shards' answers merged best first as the decoder merges them (`by_rank`: score, then id):
hit@5 of the merged answers, and the slowest shard's query time over the whole index's.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import numpy as np

from memory3.services.retrieval.embedder import Embedder
from memory3.services.retrieval.index import IVF_NPROBE, IndexShard, VectorIndex, by_rank, ivf_lists
from memory3.services.trainer.world import World, qa_prompt

from .machine import machine_info

TIMED_SEARCHES = 5  # each after an untimed one: every kind is timed warm, by the median


def _timed_search(index: VectorIndex, queries: np.ndarray) -> tuple[list, float]:
    """The hits of searching `queries` (one batch) for 5 each, and the median seconds of
    TIMED_SEARCHES searches after a warm-up one (FAISS's first search of an index pays for its
    threads and pages)."""
    hits = index.search(queries, 5)
    return hits, statistics.median(_seconds(index, queries) for _ in range(TIMED_SEARCHES))


def _seconds(index: VectorIndex, queries: np.ndarray) -> float:
    started = time.perf_counter()
    index.search(queries, 5)
    return time.perf_counter() - started


def _score(index: VectorIndex, queries: np.ndarray, truth: list[str], exact: list[list[str]] | None) -> dict:
    hits, seconds = _timed_search(index, queries)
    found = [[rid for rid, _ in row] for row in hits]
    result = {"hit_at_1": float(np.mean([row[:1] == [t] for row, t in zip(found, truth, strict=True)])),
              "hit_at_5": float(np.mean([t in row for row, t in zip(found, truth, strict=True)])),
              "query_ms": 1e3 * seconds / len(queries)}
    if exact is not None:
        result["overlap_at_5"] = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, exact, strict=True)]))
    return result


def _sharded(index: VectorIndex, shards: int, queries: np.ndarray, truth: list[str], whole: dict) -> dict:
    """Each shard searched alone, their answers merged best first; against the whole index's `whole`.
    The time ratio is the median over TIMED_SEARCHES rounds of the slowest shard's search over the
    whole index's, each round searching the whole index then every shard: a machine whose load drifts
    while one is timed and the other later skewed the ratio (HNSW's read 1.40 in a run, 0.65 alone)."""
    parts = [index.shard(IndexShard(i, shards)) for i in range(shards)]
    answers = [part.search(queries, 5) for part in parts]  # and the warm-up of each
    ratios = []
    for _ in range(TIMED_SEARCHES):
        whole_s, *part_s = (_seconds(ix, queries) for ix in (index, *parts))
        ratios.append(max(part_s) / whole_s)
    merged = [[rid for rid, _ in sorted((hit for hits in per_shard for hit in hits), key=by_rank)[:5]]
              for per_shard in zip(*answers, strict=True)]
    hit_at_5 = float(np.mean([t in row for row, t in zip(merged, truth, strict=True)]))
    ratio = statistics.median(ratios)
    return {"shards": shards, "hit_at_5": hit_at_5,
            "hit_at_5_over_whole": hit_at_5 / whole["hit_at_5"] if whole["hit_at_5"] else None,
            "slowest_shard_query_ms": ratio * whole["query_ms"], "slowest_shard_query_over_whole": ratio,
            "slowest_shard_query_over_whole_rounds": [round(r, 3) for r in ratios]}


def run_index_bench(*, references: int = 60_000, questions: int = 1000, nprobes: tuple[int, ...] = (32, 64, 128, 256),
                    nlist: int | None = None, shards: int = 4, seed: int = 0,
                    log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """`nlist` overrides the IVF-PQ lists that N calls for (toy sizes train too few vectors for them)."""
    world = World(seed, n_train=references, n_heldout=1)
    entities = world.entities[:references]
    ids = [e.id for e in entities]
    rng = random.Random(seed)
    asked = rng.sample(entities, questions)
    prompts = [qa_prompt(rng.choice(e.facts)) for e in asked]
    embedder = Embedder()
    log(f"embedding {references} references and {questions} questions with {embedder.name}")
    started = time.perf_counter()
    vectors = embedder.embed([e.document for e in entities])  # (N, dim)
    embed_s = time.perf_counter() - started
    queries = embedder.embed(prompts)
    truth = [e.id for e in asked]

    kinds: dict[str, dict] = {}
    sharded: dict[str, dict] = {}
    default_nprobe = IVF_NPROBE if IVF_NPROBE in nprobes else nprobes[-1]
    exact = None
    for kind in ("flat", "hnsw", "ivfpq"):
        log(f"building the {kind} index")
        started = time.perf_counter()
        index = VectorIndex.build(vectors, ids, kind=kind, nlist=nlist, seed=seed)
        build_s = time.perf_counter() - started
        size = len(index.to_bytes())
        if kind == "flat":
            exact = [[rid for rid, _ in row] for row in index.search(queries, 5)]
        base = {"build_s": build_s, "bytes_per_vector": size / references}
        if kind == "ivfpq":
            base["nlist"] = int(index.index.nlist)
            for nprobe in nprobes:
                index.index.nprobe = nprobe
                kinds[f"ivfpq_nprobe{nprobe}"] = {**base, "nprobe": nprobe, **_score(index, queries, truth, exact)}
            index.index.nprobe = default_nprobe
            whole = kinds[f"ivfpq_nprobe{default_nprobe}"]
        else:
            whole = kinds[kind] = {**base, **_score(index, queries, truth, exact)}
        log(f"searching the {kind} index in {shards} shards")
        sharded[kind] = _sharded(index, shards, queries, truth, whole)
    flat = kinds["flat"]
    default = kinds[f"ivfpq_nprobe{default_nprobe}"]
    return {
        "benchmark": "index",
        "protocol": {"references": references, "questions": questions, "embedder": embedder.name,
                     "dim": int(vectors.shape[1]), "ivf_lists": nlist or ivf_lists(references), "seed": seed,
                     "embed_references_s": round(embed_s, 1)},
        "machine": machine_info(),
        "kinds": kinds,
        "sharded": sharded,
        "summary": {
            "flat_hit_at_5": flat["hit_at_5"],
            "hnsw_hit_at_5_over_flat": kinds["hnsw"]["hit_at_5"] / flat["hit_at_5"],
            "ivfpq_nprobe": default_nprobe,
            "ivfpq_hit_at_5_over_flat": default["hit_at_5"] / flat["hit_at_5"],
            "ivfpq_overlap_at_5": default["overlap_at_5"],
            "ivfpq_bytes_over_flat": default["bytes_per_vector"] / flat["bytes_per_vector"],
            "shards": shards,
            **{f"{kind}_sharded_query_over_whole": v["slowest_shard_query_over_whole"] for kind, v in sharded.items()},
            **{f"{kind}_sharded_hit_at_5_over_whole": v["hit_at_5_over_whole"] for kind, v in sharded.items()},
        },
    }
