"""The index kind of published releases on a real S3 server: the size's kind after a merge or a
removal crosses a threshold, and a kind chosen, kept by derived releases."""

import hashlib

import numpy as np
import pytest

from memory3.services.release.manifest import ReleaseExists
from memory3.services.release.reader import Release
from memory3.services.release.synthetic import publish_random_release
from memory3.services.retrieval import index as index_module
from memory3.services.trainer.releases import kb_add, kb_merge, kb_remove, plan_merge, references_to_remove

pytestmark = pytest.mark.integration


class HashEmbedder:
    """A fixed random unit vector per text: every text finds itself, and nothing is downloaded."""

    name, dim = "hash-test", 32

    def __init__(self) -> None:
        self.embedded = 0

    def embed(self, texts):
        self.embedded += len(texts)
        rows = [np.random.default_rng(int.from_bytes(hashlib.blake2s(t.encode(), digest_size=8).digest()))
                .standard_normal(self.dim) for t in texts]
        out = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _documents(count: int, start: int = 0) -> list[tuple[str, str]]:
    return [("herds", f"Farmer {i} of Vell keeps {i % 13 + 2} goats and {i % 7} cows.") for i in range(start,
                                                                                                 start + count)]


def _corpus(tmp_path, name: str, documents) -> list:
    path = tmp_path / f"{name}.txt"
    path.write_text("\n\n".join(text for _, text in documents) + "\n", encoding="utf-8")
    return [path]


def _finds_itself(release: Release, embedder) -> bool:
    ids = list(release.index().iter_ids())
    texts = [release.by_id[i]["text"] for i in ids]
    return [hits[0][0] for hits in release.index().search(embedder.embed(texts), 1)] == ids


def test_shards_merged_past_the_threshold_get_the_index_of_their_size(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "HNSW_THRESHOLD", 15)
    embedder, cache = HashEmbedder(), tmp_path / "cache"
    publish_random_release(bucket, "base", _documents(12), embedder=embedder)
    base = Release.open(bucket, "base", cache)
    assert (base.manifest.index["kind"], base.manifest.index["choice"]) == ("flat", "auto")
    for shard, start in (("base-shard-0", 100), ("base-shard-1", 200)):
        kb_add(bucket, "base", _corpus(tmp_path, shard, _documents(2, start)), shard, cache, embedder=embedder,
               progress=False)
    shards = [Release.open(bucket, n, cache) for n in ("base-shard-0", "base-shard-1")]
    assert [s.manifest.index["kind"] for s in shards] == ["flat", "flat"]  # 14 each: still below

    merged = kb_merge(bucket, plan_merge(base, shards), "base-merged", progress=False)
    assert (merged.index["kind"], merged.index["type"], merged.index["count"]) == ("hnsw", "IndexHNSWFlat", 16)
    release = Release.open(bucket, "base-merged", cache)
    assert type(release.index().index).__name__ == "IndexHNSWFlat" and _finds_itself(release, embedder)

    # Three references fewer, below the threshold again: exact search again.
    fewer = kb_remove(bucket, release, references_to_remove(release, matches=["Farmer 1 ", "Farmer 2 ",
                                                                              "Farmer 100 "]),
                      "base-fewer", progress=False)
    assert (fewer.index["kind"], fewer.index["count"]) == ("flat", 13)
    assert _finds_itself(Release.open(bucket, "base-fewer", cache), embedder)


def test_a_chosen_kind_is_kept_and_an_ivfpq_index_becomes_exact_by_embedding_again(bucket, tmp_path):
    embedder, cache = HashEmbedder(), tmp_path / "cache"
    publish_random_release(bucket, "herds", _documents(index_module.IVFPQ_MIN_VECTORS), embedder=embedder)
    quantised = kb_add(bucket, "herds", _corpus(tmp_path, "more", _documents(2, 5000)), "herds-pq", cache,
                       embedder=embedder, index_kind="ivfpq", progress=False)
    assert (quantised.index["kind"], quantised.index["choice"]) == ("ivfpq", "ivfpq")
    # Merged into its exact base, the shard's references are embedded again, not copied as codes.
    herds, pq = Release.open(bucket, "herds", cache), Release.open(bucket, "herds-pq", cache)
    added = [row for row in pq.references if row["id"] not in herds.by_id]
    embedder.embedded = 0
    merged = kb_merge(bucket, plan_merge(herds, [pq]), "herds-merged", embedder=embedder, progress=False)
    assert (merged.index["kind"], merged.index["count"], embedder.embedded) == ("flat", 626, 2)
    merged_index = Release.open(bucket, "herds-merged", cache).index()
    np.testing.assert_array_equal(merged_index.vectors_of([r["id"] for r in added]),
                                  embedder.embed([r["text"] for r in added]))
    # A release derived from it keeps the choice, here below the threshold where auto is exact.
    kept = kb_remove(bucket, pq, references_to_remove(pq, matches=["Farmer 5000 "]), "herds-pq-less", progress=False)
    assert (kept.index["kind"], kept.index["choice"], kept.index["count"]) == ("ivfpq", "ivfpq", 625)
    less = Release.open(bucket, "herds-pq-less", cache)
    with pytest.raises(ValueError, match="at least 624 vectors and this one would hold 623: choose flat or hnsw"):
        kb_remove(bucket, less, references_to_remove(less, matches=["Farmer 1 ", "Farmer 2 "]), "herds-pq-least",
                  progress=False)

    # Back to exact search: every reference is embedded again, since IVF-PQ keeps approximations.
    embedder.embedded = 0
    exact = kb_add(bucket, "herds-pq-less", _corpus(tmp_path, "last", _documents(1, 6000)), "herds-exact", cache,
                   embedder=embedder, index_kind="flat", progress=False)
    assert (exact.index["kind"], exact.index["choice"], exact.index["count"]) == ("flat", "flat", 626)
    assert embedder.embedded == 1 + 626
    release = Release.open(bucket, "herds-exact", cache)
    ids = list(release.index().iter_ids())
    np.testing.assert_array_equal(release.index().vectors_of(ids),
                                  embedder.embed([release.by_id[i]["text"] for i in ids]))
    # The same inputs with another kind are other inputs.
    with pytest.raises(ReleaseExists, match="index kind 'flat' there, 'hnsw' asked"):
        kb_add(bucket, "herds-pq-less", _corpus(tmp_path, "last", _documents(1, 6000)), "herds-exact", cache,
               embedder=embedder, index_kind="hnsw", exist_ok=True, progress=False)
    assert kb_add(bucket, "herds-pq-less", _corpus(tmp_path, "last", _documents(1, 6000)), "herds-exact", cache,
                  embedder=embedder, index_kind="flat", exist_ok=True, progress=False) == exact
