"""Training -> release -> reading it back, on a real S3 server; kb add; failures leave nothing visible."""

import dataclasses
import json

import pytest
import torch

from memory3.model.checkpoint import weights_digest
from memory3.model.encoder import encode_references
from memory3.services.release.catalog import plan_deletion
from memory3.services.release.manifest import ReleaseExists, ReleaseNotFound, release_key
from memory3.services.release.reader import Release
from memory3.services.retrieval.embedder import Embedder
from memory3.services.storage.object_store import ObjectStore, StoreUnavailable
from memory3.services.trainer.corpus import CorpusError
from memory3.services.trainer.pipeline import PipelineConfig, run_pipeline
from memory3.services.trainer.releases import kb_add, publish_trained

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_pipeline(PipelineConfig.quick(), tmp_path_factory.mktemp("run"), progress=False)


@pytest.fixture(scope="module")
def published(trained, store, embedder):
    manifest = publish_trained(trained, store, "quick-1", embedder=embedder, progress=False,
                               pipeline_config=PipelineConfig.quick().to_dict())
    return manifest


def test_release_round_trip(trained, store, published, tmp_path):
    release = Release.open(store, "quick-1", tmp_path)
    assert release.manifest.memory_bank["count"] == len(trained.references)
    assert release.manifest.conventions["chunk_len"] == trained.model.config.chunk_len
    model = release.load_model()
    tokens = torch.randint(3, 300, (1, 40))
    positions = torch.arange(40)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, positions), trained.model(tokens, positions))
    ref = trained.references[3]
    fetched = release.fetch_memories([ref.id])[0]
    with torch.no_grad():
        direct = encode_references(trained.model, [list(ref.tokens)], trained.codec.reference_prefix(model.config))[0]
    assert torch.equal(fetched.positions, direct.positions)
    torch.testing.assert_close(fetched.keys, direct.keys, rtol=1e-2, atol=1e-2)  # stored as bf16
    hits = release.index().search(Embedder().embed([ref.text]), 1)
    assert hits[0][0][0] == ref.id


def test_processes_that_share_a_cache_open_a_release_at_once(store, published, tmp_path):
    """As the local stack's index shards do: each download lands whole, whoever replaces last."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        releases = list(pool.map(lambda _: Release.open(store, "quick-1", tmp_path), range(8)))
    assert {r.manifest.name for r in releases} == {"quick-1"}
    assert not list(tmp_path.rglob("*.part"))
    Release.open(store, "quick-1", tmp_path)  # every file verified against its checksum


def test_release_names_are_immutable(trained, store, published, embedder):
    with pytest.raises(ReleaseExists, match="already exists"):
        publish_trained(trained, store, "quick-1", embedder=embedder, progress=False)


def test_missing_release_and_corrupt_file_are_reported(store, published, tmp_path):
    with pytest.raises(ReleaseNotFound, match="does not exist"):
        Release.open(store, "no-such-release", tmp_path)
    key = release_key("quick-1", "references.jsonl")
    original = store.get_bytes(key)
    store.put_bytes(key, original.replace(b"a", b"b", 1))
    try:
        with pytest.raises(ValueError, match="checksum"):
            Release.open(store, "quick-1", tmp_path / "other")
        assert not list((tmp_path / "other").rglob("*.part"))  # the refused download is not left behind
    finally:
        store.put_bytes(key, original)


def test_a_release_is_downloaded_in_chunks_never_whole(store, published, tmp_path, monkeypatch):
    """Each file was read whole into memory, then written: a paper-size model's weights (about 5 GB)
    needed their size in RAM twice over, with the copy being written."""
    whole = ObjectStore.get_bytes

    def get_bytes(self, key):
        assert key.endswith("manifest.json"), f"{key} read whole"  # the manifest alone is read whole
        return whole(self, key)

    monkeypatch.setattr(ObjectStore, "get_bytes", get_bytes)
    chunks = []
    real = ObjectStore.download

    def download(self, key, out, chunk_bytes=8 << 20):
        class Counting:
            def write(self, data):
                chunks.append(len(data))
                return out.write(data)
        return real(self, key, Counting(), chunk_bytes=4096)

    monkeypatch.setattr(ObjectStore, "download", download)
    release = Release.open(store, "quick-1", tmp_path)
    assert max(chunks) <= 4096 and sum(chunks) == sum(meta["bytes"] for meta in release.manifest.files.values())
    assert release.load_model() is not None


def test_unreachable_store_fails_clearly_and_leaves_nothing(trained, local_s3, embedder):
    dead = ObjectStore(dataclasses.replace(local_s3.config, endpoint="127.0.0.1:9", timeout_s=1.0))
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        publish_trained(trained, dead, "never", embedder=embedder, progress=False)


def test_interrupted_publication_is_invisible(trained, store, embedder, monkeypatch):
    def broken_embed(texts):
        raise RuntimeError("embedder crashed")

    monkeypatch.setattr(embedder, "embed", broken_embed)
    with pytest.raises(RuntimeError, match="embedder crashed"):
        publish_trained(trained, store, "half", embedder=embedder, progress=False)
    assert store.list_keys(release_key("half", "")) == []


def test_kb_add_derives_a_release_without_retraining(store, published, tmp_path, embedder):
    doc = tmp_path / "new.txt"
    doc.write_text("The Qorvath Beacon stands in Lumbrastad. It was lit in 1901.\n\n"
                   "Lumbrastad exports copper bells to Varnholm.\n")
    manifest = kb_add(store, "quick-1", [doc], "quick-1-added", tmp_path / "cache", embedder=embedder,
                      progress=False)
    parent = Release.open(store, "quick-1", tmp_path / "cache")
    child = Release.open(store, "quick-1-added", tmp_path / "cache")
    assert manifest.parent == "quick-1"
    assert len(child.references) == len(parent.references) + 2
    assert child.manifest.memory_bank["bank"] == parent.manifest.memory_bank["bank"]  # same weights
    assert weights_digest(child.load_model()) == weights_digest(parent.load_model())  # no retraining
    new = [r for r in child.references if r["source"] == str(doc)]
    assert child.fetch_memories([new[0]["id"]])[0].keys.shape[0] == len(child.load_model().config.memory_layers)
    hits = child.index().search(embedder.embed(["Where does the Qorvath Beacon stand?"]), 1)
    assert hits[0][0][0] == new[0]["id"]
    with pytest.raises(CorpusError, match="already in release"):
        kb_add(store, "quick-1-added", [doc], "quick-1-again", tmp_path / "cache", embedder=embedder, progress=False)
    # Run again (a retried Job), it is refused, or with exist_ok returned as it is, unless asked for more.
    with pytest.raises(ReleaseExists, match="--exist-ok"):
        kb_add(store, "quick-1", [doc], "quick-1-added", tmp_path / "cache", embedder=embedder, progress=False)
    assert kb_add(store, "quick-1", [doc], "quick-1-added", tmp_path / "cache", embedder=embedder, progress=False,
                  exist_ok=True) == manifest
    more = tmp_path / "more.txt"
    more.write_text(doc.read_text() + "\nVarnholm bells ring at noon.\n")
    with pytest.raises(ReleaseExists, match="other inputs .1 of the references asked for are not there, 0 others"):
        kb_add(store, "quick-1", [more], "quick-1-added", tmp_path / "cache", embedder=embedder, progress=False,
               exist_ok=True)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe broken")
    with pytest.raises(CorpusError, match="not UTF-8"):
        kb_add(store, "quick-1", [bad], "quick-1-bad", tmp_path / "cache", embedder=embedder, progress=False)
    assert json.loads(store.get_bytes(release_key("quick-1-added", "manifest.json")))["parent"] == "quick-1"


def test_a_reference_holding_a_unicode_line_separator_reads_back(store, published, tmp_path, embedder):
    """The table is JSON Lines split at newlines only: U+2028, which JSON leaves unescaped, is text."""
    doc = tmp_path / "separator.txt"
    text = "The Vell ferry timetable reads:\u2028 departures at 7 and 19. Tickets on board."
    doc.write_text(text + "\n", encoding="utf-8")
    kb_add(store, "quick-1", [doc], "quick-1-separator", tmp_path / "cache", embedder=embedder, progress=False)
    release = Release.open(store, "quick-1-separator", tmp_path / "other")
    assert [r["text"] for r in release.rows() if r["source"] == str(doc)] == [text]
    assert list(release.index().iter_ids()) == [r["id"] for r in release.references]
    assert len(plan_deletion(store, "quick-1-separator").memory_keys) == 1  # only its own new memory


@pytest.mark.parametrize("remote", [True, False])
def test_a_decoder_downloads_only_what_its_retrieval_reads(random_release, local_s3, tmp_path, remote):
    """A decoder of remote retrieval downloaded the index and the reference table, the largest files
    at scale, which only the text and memory services read (and the memory service's ids)."""
    from memory3.services.decoder.server import DecoderSettings, open_release

    addresses = {"text_address": "127.0.0.1:1", "memory_address": "127.0.0.1:2"} if remote else {}
    release = open_release(DecoderSettings(release=random_release.name, s3=local_s3.config, cache_dir=tmp_path,
                                           **addresses))
    local = tmp_path / random_release.name
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    left_out = {"index.faiss", "references.jsonl", "memory_ids.npy"} if remote else set()
    assert files == set(release.manifest.files) - left_out
    release.load_model()  # all the engine reads
    release.text_codec(), release.memory_codec(), release.memory_shape()


def test_a_publication_keeps_the_memories_other_releases_list(bucket, embedder, tmp_path, monkeypatch):
    """A memory's key follows from its reference's text, its bytes do not: encoded again (in another
    batch, on another device) the same reference differs within rounding. A sibling's publication of a
    shared document replaced the blob published releases list by its sha256, and the memory service
    then refused it to them (DATA_LOSS). Encodings that differ are made here by shifting the keys."""
    from memory3.services.release import publish
    from memory3.services.release.synthetic import publish_random_release

    publish_random_release(bucket, "p", [("d", f"Base document {i} about harbours and tides.") for i in range(3)],
                           embedder=embedder)
    shared = "The lighthouse of Quarnby was built in 1871 from granite."
    (tmp_path / "b.txt").write_text(shared)
    (tmp_path / "c.txt").write_text(shared + "\n\nThe ferry to Quarnby leaves every hour from the north pier.")
    kb_add(bucket, "p", [tmp_path / "b.txt"], "b", tmp_path / "cache", embedder=embedder, progress=False)
    b = Release.open(bucket, "b", tmp_path / "cache")
    held = {rid: bucket.get_bytes(row["memory_key"]) for rid, row in b.by_id.items()}

    real = publish.encode_references

    def elsewhere(*args, **kwargs):  # the same references, other rounding
        return [dataclasses.replace(m, keys=m.keys + 0.01) for m in real(*args, **kwargs)]

    monkeypatch.setattr(publish, "encode_references", elsewhere)
    kb_add(bucket, "p", [tmp_path / "c.txt"], "c", tmp_path / "cache", embedder=embedder, progress=False)
    c = Release.open(bucket, "c", tmp_path / "cache")
    assert {rid: bucket.get_bytes(b.by_id[rid]["memory_key"]) for rid in b.by_id} == held  # none replaced
    assert len(b.fetch_memories(list(b.by_id))) == len(b.by_id)  # each as b's table records it
    assert len(c.fetch_memories(list(c.by_id))) == len(c.by_id)
    both = (set(b.by_id) & set(c.by_id)) - set(Release.open(bucket, "p", tmp_path / "cache").by_id)
    assert both and all(c.by_id[rid]["memory_sha256"] == b.by_id[rid]["memory_sha256"] for rid in both)
    new = set(c.by_id) - set(b.by_id)
    assert new and all(bucket.get_bytes(c.by_id[rid]["memory_key"]) for rid in new)
