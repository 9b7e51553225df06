"""An index served in shards over real gRPC: N text services, each with every N-th reference, answer
together what one service with the whole index answers; shards that do not make one index are refused.
A shard is built once: a restart reads the copy it kept, a pod elsewhere the one kept in the object
store, unless it is damaged or of another shape (then it is built again, never served)."""

import asyncio
import hashlib
import json
import time
from contextlib import AsyncExitStack

import grpc
import numpy as np
import pytest
from text_release import DOCUMENTS, build_text_release

from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.cli.main import main
from memory3.services.release import file_shards as file_shards_module
from memory3.services.release import reader as reader_module
from memory3.services.release.file_shards import bytes_key, pointer_key, shards_dir, unnamed_bytes
from memory3.services.release.manifest import release_key
from memory3.services.release.publish import INDEX_FILE, REFERENCES_FILE
from memory3.services.release.reader import read_manifest
from memory3.services.release.synthetic import publish_random_release
from memory3.services.retrieval import index as index_module
from memory3.services.retrieval.index import IndexShard, VectorIndex
from memory3.services.rpc.server import ServerOptions
from memory3.services.storage.object_store import StoreUnavailable
from memory3.services.text.client import ShardedTextClient, ShardMismatch, TextClient
from memory3.services.text.engine import TextEngine, load_release_resources
from memory3.services.text.server import start_text_server

pytestmark = pytest.mark.integration
RELEASE = "text-shards"
QUESTIONS = ["Where was Orvath Kellen born?", "Who founded the Hollin Orchestra?", "How heavy is the Quarn-7 pump?",
             "What is Dastra famous for?", "Which lighthouse guides the fishing boats?"]


@pytest.fixture(scope="module")
def references(store, embedder):
    return build_text_release(store, RELEASE, embedder)


def run_services(store, cache_dir, embedder, shards: list[IndexShard | None], body):
    """Start one TextService per entry (None: the whole index), run `body(clients, engines)`, stop them."""
    async def scenario():
        async with AsyncExitStack() as stack:
            clients, engines = [], []
            for shard in shards:
                engine = TextEngine.for_release(store, RELEASE, cache_dir, embedder_factory=lambda: embedder,
                                                shard=shard or IndexShard(0, 1))
                server = await start_text_server(engine, ServerOptions())
                stack.push_async_callback(server.stop)
                channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))
                clients.append(TextClient(channel))
                engines.append(engine)
            await body(clients, engines)
    asyncio.run(scenario())


def test_three_shards_answer_what_the_whole_index_answers(store, references, embedder, tmp_path):
    codec = TextCodec(byte_level_tokenizer())
    chunks = [codec.encode(r.text)[:20] for r in references[::3]]  # a chunk's token ids, as the decoder sends

    async def body(clients, engines):
        whole, shards = clients[0], ShardedTextClient(clients[1:])
        held = [list(engine._resources.index.iter_ids()) for engine in engines[1:]]
        assert sorted(rid for ids in held for rid in ids) == sorted(r.id for r in references)
        assert all(len(ids) >= len(references) // 3 for ids in held)  # each holds its third
        assert [set(engine._resources.texts) for engine in engines[1:]] == [set(ids) for ids in held]
        for top_k in (0, 2, 5):
            for asked, expected in ((shards.retrieve_texts(QUESTIONS, top_k, True),
                                     whole.retrieve_texts(QUESTIONS, top_k, True)),
                                    (shards.retrieve(chunks, top_k), whole.retrieve(chunks, top_k))):
                got, want = await asyncio.gather(asked, expected)
                assert [[rid for rid, _, _ in hits] for hits in got] == [[rid for rid, _, _ in hits] for hits in want]
                for hits, wanted in zip(got, want, strict=True):
                    assert [(text, pytest.approx(score, abs=1e-5)) for _, score, text in hits] == \
                        [(text, score) for _, score, text in wanted]
        assert shards.release == RELEASE
        assert await shards.tokenize("Lunmar") == await whole.tokenize("Lunmar")

    run_services(store, tmp_path / "cache", embedder, [None, IndexShard(0, 3), IndexShard(1, 3), IndexShard(2, 3)],
                 body)


def test_shards_that_do_not_make_one_index_are_refused_with_what_to_fix(store, references, embedder, tmp_path):
    async def body(clients, engines):
        whole, first, second = clients
        with pytest.raises(ShardMismatch, match=r"hold index shards 0/2, 0/2, where shards 0/2 to 1/2 were expected"):
            await ShardedTextClient([first, first]).retrieve_texts(QUESTIONS[:1])
        with pytest.raises(ShardMismatch, match=r"hold index shards 0/1, 1/2, where"):
            await ShardedTextClient([whole, second]).retrieve_texts(QUESTIONS[:1])
        assert len(await ShardedTextClient([second, first]).retrieve_texts(QUESTIONS[:1])) == 1  # any order

    run_services(store, tmp_path / "cache", embedder, [None, IndexShard(0, 2), IndexShard(1, 2)], body)


class HashEmbedder:
    """A fixed random unit vector per text: nothing is downloaded."""

    name, dim = "hash-test", 32

    def embed(self, texts):
        rows = [np.random.default_rng(int.from_bytes(hashlib.blake2s(t.encode(), digest_size=8).digest()))
                .standard_normal(self.dim) for t in texts]
        out = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_restarted_shard_reads_the_shard_it_built_instead_of_building_it_again(bucket, tmp_path, monkeypatch, kind):
    monkeypatch.setattr(index_module, "HNSW_THRESHOLD", 1 if kind == "hnsw" else 10**6)
    publish_random_release(bucket, "kept", DOCUMENTS, embedder=HashEmbedder())
    cache = tmp_path / "cache"
    first = load_release_resources(bucket, "kept", cache, IndexShard(1, 3)).index
    assert first.kind == kind

    def build_again(*args, **kwargs):
        raise AssertionError("the shard was built again")

    monkeypatch.setattr(VectorIndex, "build", build_again)
    monkeypatch.setattr(reader_module, "fetch_shard", lambda *args: False)  # the local copy, not the store's
    again = load_release_resources(bucket, "kept", cache, IndexShard(1, 3)).index
    queries = first.vectors_of(first.ids)
    assert again.ids.tolist() == first.ids.tolist() and again.kind == kind
    assert again.search(queries, 3) == first.search(queries, 3)


def test_a_kept_shard_that_is_damaged_or_partial_is_built_again_never_served(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(reader_module, "fetch_shard", lambda *args: False)  # built here, not downloaded
    publish_random_release(bucket, "kept", DOCUMENTS, embedder=HashEmbedder())
    cache = tmp_path / "cache"
    built = load_release_resources(bucket, "kept", cache, IndexShard(1, 3)).index
    kept = next(cache.rglob("1-of-3.faiss"), None)
    assert kept is not None, "the shard built was not kept"
    checksum, stored = kept.with_name(kept.name + ".sha256"), kept.read_bytes()
    queries = built.vectors_of(built.ids)
    for damage in (lambda: kept.write_bytes(stored[: len(stored) // 2]),  # cut short
                   lambda: kept.write_bytes(stored[:-9] + bytes([stored[-9] ^ 1]) + stored[-8:]),  # a bit of a vector
                   lambda: checksum.unlink()):  # stopped before its checksum was written
        damage()
        loaded = load_release_resources(bucket, "kept", cache, IndexShard(1, 3)).index
        assert loaded.ids.tolist() == built.ids.tolist() and loaded.search(queries, 3) == built.search(queries, 3)
        assert kept.read_bytes() == stored  # built again and kept in its place
        assert checksum.read_text().strip() == hashlib.sha256(stored).hexdigest()
    texts = load_release_resources(bucket, "kept", cache, IndexShard(1, 3)).texts
    table = next(cache.rglob("1-of-3.jsonl"))
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:-1]))  # a row short
    table.with_name(table.name + ".sha256").write_text(hashlib.sha256(table.read_bytes()).hexdigest())
    assert load_release_resources(bucket, "kept", cache, IndexShard(1, 3)).texts == texts
    assert table.read_text().splitlines(keepends=True) == lines


def serve_nothing_but_the_kept_shard(monkeypatch):
    """From here on, building a shard fails the test."""
    def refused(*args, **kwargs):
        raise AssertionError("the shard was built")

    monkeypatch.setattr(VectorIndex, "build", refused)
    monkeypatch.setattr(VectorIndex, "read_shard", refused)


def pointer(bucket, release, shard, file=INDEX_FILE):
    file_sha256 = read_manifest(bucket, release).files[file]["sha256"]
    key = pointer_key(file_sha256, shard)
    named = json.loads(bucket.get_bytes(key))
    return key, named, bytes_key(file_sha256, shard, named["sha256"])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_shard_built_on_one_pod_is_downloaded_by_the_next_without_the_whole_index(bucket, tmp_path, monkeypatch,
                                                                                     kind):
    """Another pod (another local cache) downloads the shard the first cut, and neither builds it nor
    downloads the release's index file or reference table."""
    monkeypatch.setattr(index_module, "HNSW_THRESHOLD", 1 if kind == "hnsw" else 10**6)
    publish_random_release(bucket, "shared", DOCUMENTS, embedder=HashEmbedder())
    loaded = load_release_resources(bucket, "shared", tmp_path / "pod-a", IndexShard(2, 3))
    first = loaded.index
    _, named, where = pointer(bucket, "shared", IndexShard(2, 3))
    assert named == {"sha256": hashlib.sha256(bucket.get_bytes(where)).hexdigest(), "bytes": bucket.size(where),
                     "rows": len(first.ids), "dim": HashEmbedder.dim, "kind": kind}
    _, named, where = pointer(bucket, "shared", IndexShard(2, 3), REFERENCES_FILE)
    assert named["rows"] == len(first.ids) and named["sha256"] == hashlib.sha256(bucket.get_bytes(where)).hexdigest()
    assert not bucket.list_keys(release_key("shared", "shards"))  # nothing under the published release
    queries = first.vectors_of(first.ids)
    serve_nothing_but_the_kept_shard(monkeypatch)
    again = load_release_resources(bucket, "shared", tmp_path / "pod-b", IndexShard(2, 3))
    assert again.index.ids.tolist() == first.ids.tolist() and again.index.kind == kind and again.texts == loaded.texts
    assert again.index.search(queries, 3) == first.search(queries, 3)
    assert not any((tmp_path / "pod-b" / "shared" / file).exists() for file in (INDEX_FILE, REFERENCES_FILE))


@pytest.mark.parametrize("file", [INDEX_FILE, REFERENCES_FILE])
def test_a_shard_in_the_store_that_does_not_match_is_cut_again_and_put_anew(bucket, tmp_path, file):
    publish_random_release(bucket, "shared", DOCUMENTS, embedder=HashEmbedder())
    cut = load_release_resources(bucket, "shared", tmp_path / "pod-a", IndexShard(0, 2))
    built = cut.index
    key, named, where = pointer(bucket, "shared", IndexShard(0, 2), file)
    stored = bucket.get_bytes(where)
    queries = built.vectors_of(built.ids)
    for pod, damage in enumerate((
            lambda: bucket.put_bytes(where, stored[:-9] + bytes([stored[-9] ^ 1]) + stored[-8:]),  # a bit flipped
            lambda: bucket.remove_keys([where]),  # its bytes gone
            lambda: bucket.put_bytes(key, b"\xff{"),  # an unreadable pointer
            lambda: bucket.put_bytes(key, json.dumps({**named, "rows": named["rows"] + 1}).encode()),  # another shape
    )):
        damage()
        loaded = load_release_resources(bucket, "shared", tmp_path / f"pod-{pod}", IndexShard(0, 2))
        assert loaded.index.search(queries, 3) == built.search(queries, 3) and loaded.texts == cut.texts
        assert json.loads(bucket.get_bytes(key)) == named and bucket.get_bytes(where) == stored  # put anew


def test_pods_that_cut_one_shard_at_once_leave_a_pointer_to_bytes_that_match_it(bucket, tmp_path, monkeypatch):
    """Two pods miss the store and cut the same shard; the second puts its bytes and its pointer
    between the first's bytes and pointer. Their HNSW graphs differ: had they shared one key, the
    first's pointer would name the second's bytes, and every pod after would cut the shard again."""
    monkeypatch.setattr(index_module, "HNSW_THRESHOLD", 1)
    publish_random_release(bucket, "shared", DOCUMENTS, embedder=HashEmbedder())
    index_sha256 = read_manifest(bucket, "shared").files[INDEX_FILE]["sha256"]
    first_pointer, put = pointer_key(index_sha256, IndexShard(1, 2)), bucket.put_bytes
    raced = []

    def put_bytes(key, data, *args):
        if key == first_pointer and not raced:  # the first pod, between its bytes and its pointer
            raced.append(True)
            with monkeypatch.context() as other:
                other.setattr(index_module, "HNSW_EF_CONSTRUCTION", 16)  # another graph
                load_release_resources(bucket, "shared", tmp_path / "pod-b", IndexShard(1, 2))
        put(key, data, *args)

    monkeypatch.setattr(bucket, "put_bytes", put_bytes)
    first = load_release_resources(bucket, "shared", tmp_path / "pod-a", IndexShard(1, 2)).index
    monkeypatch.setattr(bucket, "put_bytes", put)
    faiss_bytes = [key for key in bucket.list_keys(shards_dir(index_sha256)) if not key.endswith(".json")]
    assert raced and len(faiss_bytes) == 2  # each pod's own
    _, named, where = pointer(bucket, "shared", IndexShard(1, 2))
    assert hashlib.sha256(bucket.get_bytes(where)).hexdigest() == named["sha256"]
    monkeypatch.setattr(file_shards_module, "UNNAMED_GRACE_S", -1.0)
    assert unnamed_bytes(bucket, index_sha256) == [key for key in faiss_bytes if key != where]
    serve_nothing_but_the_kept_shard(monkeypatch)
    again = load_release_resources(bucket, "shared", tmp_path / "pod-c", IndexShard(1, 2)).index
    assert again.ids.tolist() == first.ids.tolist()


def test_a_shard_cut_where_the_disk_refuses_it_is_built_once_and_served(bucket, tmp_path, monkeypatch, caplog):
    publish_random_release(bucket, "shared", DOCUMENTS, embedder=HashEmbedder())
    whole = load_release_resources(bucket, "shared", tmp_path / "whole").index
    read_shard, builds = VectorIndex.read_shard, []

    def counted(*args):
        builds.append(args)
        return read_shard(*args)

    def full_disk(path, write):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(VectorIndex, "read_shard", counted)
    monkeypatch.setattr(reader_module, "_keep_file", full_disk)
    monkeypatch.setattr(reader_module, "fetch_shard", lambda *args: False)
    loaded = load_release_resources(bucket, "shared", tmp_path / "pod-a", IndexShard(1, 2))
    assert loaded.index.ids.tolist() == whole.ids[1::2].tolist() and len(builds) == 1
    assert "No space left on device" in caplog.text


@pytest.mark.parametrize("method", ["get_bytes", "download"])  # the pointer's read, the bytes'
def test_a_store_that_does_not_answer_stops_the_start_rather_than_a_cut_from_the_whole_files(bucket, tmp_path,
                                                                                           monkeypatch, method):
    publish_random_release(bucket, "shared", DOCUMENTS, embedder=HashEmbedder())
    load_release_resources(bucket, "shared", tmp_path / "pod-a", IndexShard(1, 2))
    answer = getattr(bucket, method)

    def outage(key, *args, **kwargs):
        if key.startswith("shards/"):
            raise StoreUnavailable(f"get {key}: cannot reach the object store")
        return answer(key, *args, **kwargs)

    monkeypatch.setattr(bucket, method, outage)
    serve_nothing_but_the_kept_shard(monkeypatch)
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        load_release_resources(bucket, "shared", tmp_path / "pod-b", IndexShard(1, 2))
    assert not any((tmp_path / "pod-b" / "shared" / file).exists() for file in (INDEX_FILE, REFERENCES_FILE))


def test_a_pod_that_cuts_the_index_shard_alone_does_not_download_the_table(bucket, tmp_path):
    publish_random_release(bucket, "shared", DOCUMENTS, embedder=HashEmbedder())
    cut = load_release_resources(bucket, "shared", tmp_path / "pod-a", IndexShard(0, 2))
    key, _, _ = pointer(bucket, "shared", IndexShard(0, 2))
    bucket.remove_keys([key])  # the index's shard is gone; the table's is there
    again = load_release_resources(bucket, "shared", tmp_path / "pod-b", IndexShard(0, 2))
    assert again.index.ids.tolist() == cut.index.ids.tolist() and again.texts == cut.texts
    assert (tmp_path / "pod-b" / "shared" / INDEX_FILE).exists()
    assert not (tmp_path / "pod-b" / "shared" / REFERENCES_FILE).exists()


def test_a_store_that_refuses_the_shard_does_not_stop_the_pod(bucket, tmp_path, monkeypatch, caplog):
    publish_random_release(bucket, "shared", DOCUMENTS, embedder=HashEmbedder())
    whole = load_release_resources(bucket, "shared", tmp_path / "whole").index

    def refuse(key, *args, **kwargs):
        raise StoreUnavailable(f"put {key}: the object store refused the request (AccessDenied)")

    monkeypatch.setattr(bucket, "put_file", refuse)
    loaded = load_release_resources(bucket, "shared", tmp_path / "pod-a", IndexShard(1, 2)).index
    assert loaded.ids.tolist() == whole.ids[1::2].tolist()
    assert "could not keep shard 1/2 of index.faiss in the store" in caplog.text


def test_release_shard_index_fails_when_the_store_does_not_keep_a_shard(bucket, tmp_path, monkeypatch, capsys):
    from memory3.services.storage.object_store import ObjectStore

    publish_random_release(bucket, "ahead", DOCUMENTS, embedder=HashEmbedder())
    s3 = bucket.config

    def refuse(self, key, *args, **kwargs):
        raise StoreUnavailable(f"put {key}: the object store refused the request (AccessDenied)")

    monkeypatch.setattr(ObjectStore, "put_file", refuse)
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", s3.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", s3.secret_key)
    assert main(["release", "shard-index", "ahead", "--shards", "2", "--cache-dir", str(tmp_path / "cli"),
                 "--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket]) == 2
    printed = capsys.readouterr()
    assert "kept in the store, in" not in printed.out
    assert "shard 0/2 of references.jsonl and index.faiss was cut but could not be kept in the store" in printed.err


def test_release_shard_index_builds_every_shard_ahead_of_the_pods(bucket, tmp_path, monkeypatch, capsys):
    publish_random_release(bucket, "ahead", DOCUMENTS, embedder=HashEmbedder())
    whole = load_release_resources(bucket, "ahead", tmp_path / "whole").index
    s3 = bucket.config
    args = ["release", "shard-index", "ahead", "--shards", "3", "--cache-dir", str(tmp_path / "cli"),
            "--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket]
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", s3.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", s3.secret_key)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines()] == [f"shard {i}/3" for i in range(3)]
    assert "kept in the store" in printed
    _, _, where = pointer(bucket, "ahead", IndexShard(1, 3))
    bucket.remove_keys([where])  # lost: cut again
    assert main(args) == 0
    assert capsys.readouterr().out.count("kept already") == 2
    serve_nothing_but_the_kept_shard(monkeypatch)
    shards = [load_release_resources(bucket, "ahead", tmp_path / f"pod-{i}", IndexShard(i, 3)).index for i in range(3)]
    assert [s.ids.tolist() for s in shards] == [whole.ids[i::3].tolist() for i in range(3)]
    assert not any((tmp_path / f"pod-{i}" / "ahead" / file).exists() for i in range(3)
                   for file in (INDEX_FILE, REFERENCES_FILE))
    assert not list((tmp_path / "cli").iterdir())  # its copy of the release is gone


def test_release_shard_index_keeps_one_shard_on_disk_at_a_time_and_waits_for_its_release(bucket, tmp_path,
                                                                                          monkeypatch, capsys):
    from memory3.services.release.reader import SHARDS_DIR, Release

    publish_random_release(bucket, "ahead", DOCUMENTS, embedder=HashEmbedder())
    s3 = bucket.config
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", s3.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", s3.secret_key)
    kept_before = []
    cut = Release.reference_shard

    def counted(self, shard):  # what is kept locally when a shard's cut starts
        kept_before.append(sorted(p.name for p in (self.local_dir / SHARDS_DIR).rglob("*-of-*")))
        return cut(self, shard)

    monkeypatch.setattr(Release, "reference_shard", counted)
    args = ["--cache-dir", str(tmp_path / "cli"), "--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket]
    assert main(["release", "shard-index", "ahead", "--shards", "3", "--wait", "5", *args]) == 0
    assert kept_before == [[], [], []]  # each shard's copy went once the store kept it
    capsys.readouterr()
    started = time.monotonic()
    assert main(["release", "shard-index", "never", "--shards", "2", "--wait", "0.5", *args]) != 0
    assert time.monotonic() - started < 30
    assert "never" in capsys.readouterr().err


def test_release_gc_removes_the_shards_of_counts_no_longer_served_once_told_which_are(bucket, tmp_path,
                                                                                       monkeypatch, capsys):
    """Text services moved from 2 shards to 3 left the 2-shard cut in the bucket for as long as the release
    was published: the bucket cannot tell which counts are served. `--shard-counts 3` says so, and the
    others go; the served ones stay, downloaded by the next pods without a cut."""
    publish_random_release(bucket, "resharded", DOCUMENTS, embedder=HashEmbedder())
    whole = load_release_resources(bucket, "resharded", tmp_path / "whole").index
    s3 = bucket.config
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", s3.access_key)
    monkeypatch.setenv("MEMORY3_S3_SECRET_KEY", s3.secret_key)
    store = ["--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket]
    for count in ("2", "3"):
        assert main(["release", "shard-index", "resharded", "--shards", count, "--cache-dir", str(tmp_path / "cli"),
                     *store]) == 0
    files = [read_manifest(bucket, "resharded").files[file]["sha256"] for file in (INDEX_FILE, REFERENCES_FILE)]

    def kept() -> dict[int, int]:
        """Objects kept for the release's shards, by shard count."""
        by_count: dict[int, int] = {}
        for sha in files:
            for key in bucket.list_keys(shards_dir(sha)):
                count = int(key[len(shards_dir(sha)):].split("-of-")[1].split(".")[0])
                by_count[count] = by_count.get(count, 0) + 1
        return by_count

    assert kept() == {2: 8, 3: 12}  # per file and shard: a pointer and its bytes
    # Bytes a pod has just put for a served count, before its pointer: young, they stay whatever is served.
    young = bytes_key(files[0], IndexShard(0, 3), "f" * 64)
    bucket.put_bytes(young, b"a pod's cut, its pointer on its way")
    assert main(["release", "gc", *store]) == 0  # not told: every count stays
    assert main(["release", "gc", "--shard-counts", "3", "--dry-run", *store]) == 0
    assert kept() == {2: 8, 3: 13}
    planned = capsys.readouterr().out
    assert planned.count("4 objects go (2 shards: 4)") == 2  # the 2-shard cut of each file
    assert "warning" not in planned  # 3 is kept
    assert main(["release", "gc", "--shard-counts", "3,4", *store]) == 0
    assert kept() == {3: 13}
    # 4 is served by no pod that has cut a shard yet: said, in case it was meant to be 2.
    assert "warning: no published release has shards of 4 kept" in capsys.readouterr().out
    bucket.remove_keys([young])
    serve_nothing_but_the_kept_shard(monkeypatch)
    shards = [load_release_resources(bucket, "resharded", tmp_path / f"pod-{i}", IndexShard(i, 3)).index
              for i in range(3)]
    assert [s.ids.tolist() for s in shards] == [whole.ids[i::3].tolist() for i in range(3)]
    assert main(["release", "gc", "--shard-counts", "none", *store]) == 0
    assert kept() == {}
