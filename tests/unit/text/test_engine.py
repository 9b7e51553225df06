"""TextEngine logic with a small in-memory release and a deterministic stand-in embedder."""

import asyncio
import hashlib
import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY

from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.release.manifest import ReleaseError
from memory3.services.retrieval.index import VectorIndex
from memory3.services.rpc.errors import InvalidInput, ResourceExhausted, Unavailable
from memory3.services.text.engine import MAX_QUERIES, MAX_TEXT_BYTES, Query, TextEngine, TextResources

REFERENCES = [
    "Orvath Kellen was born in the city of Lunmar and works as a glassblower.",
    "The city of Lunmar lies on the river Tessa and is known for its copper bridges.",
    "Veltrix Industries makes the Quarn-7 pump, sold since 2011 to water companies.",
    "Mira Sobel founded the Hollin Orchestra and conducts it every winter season.",
    "The Quarn-7 pump weighs forty kilograms and runs on a single phase motor.",
    "Dastra is a mountain town where the annual cheese market draws many visitors.",
    "Pell Andora teaches astronomy at the university of Corvinne near the coast.",
    "The Hollin Orchestra plays mostly baroque music in the old grain hall.",
]


class TrigramEmbedder:
    """Hashed character trigrams, L2-normalised: similar strings get similar vectors."""

    name = "trigram-test"
    dim = 256

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            t = f"  {text.lower()}  "
            for j in range(len(t) - 2):
                out[i, int.from_bytes(hashlib.blake2s(t[j:j + 3].encode(), digest_size=4).digest()) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def resources(texts=REFERENCES, embedder_name="trigram-test") -> TextResources:
    ids = [f"ref{i:02d}" for i in range(len(texts))]
    index = VectorIndex.build(TrigramEmbedder().embed(texts), ids)
    return TextResources(release="unit", codec=TextCodec(byte_level_tokenizer()), index=index,
                         texts=dict(zip(ids, texts, strict=True)), default_top_k=5, embedder_name=embedder_name)


def engine(texts=REFERENCES, embedder=None, **kw) -> TextEngine:
    return TextEngine(lambda: resources(texts), lambda: embedder or TrigramEmbedder(), **kw)


def retrieve(eng, queries, top_k=0, include_text=False):
    async def go():
        await eng.start()
        return await eng.retrieve(queries, top_k, include_text)
    return asyncio.run(go())


def started(eng) -> TextEngine:
    asyncio.run(eng.start())
    return eng


def test_tokenize_and_detokenize_round_trip():
    eng = started(engine())
    ids = eng.tokenize("Lunmar bridges")
    assert eng.detokenize(ids) == "Lunmar bridges"
    assert eng.tokenize("Lunmar", add_bos=True)[0] == eng._resources.codec.bos_id
    assert eng.tokenize("") == []


def test_detokenize_names_the_bad_id():
    eng = started(engine())
    vocab = eng._resources.codec.vocab_size
    with pytest.raises(InvalidInput, match=rf"token_ids\[1\] = {vocab} is not a token id"):
        eng.detokenize([5, vocab, 7])
    with pytest.raises(InvalidInput, match=r"token_ids\[0\] = -1"):
        eng.detokenize([-1])


def test_text_over_the_size_limit_is_refused():
    eng = started(engine())
    with pytest.raises(InvalidInput, match="at most 65536 bytes"):
        eng.tokenize("x" * (MAX_TEXT_BYTES + 1))
    assert len(eng.tokenize("x" * MAX_TEXT_BYTES)) == MAX_TEXT_BYTES


def test_calls_before_start_are_unavailable():
    eng = engine()
    with pytest.raises(Unavailable, match="still loading"):
        eng.tokenize("a")
    with pytest.raises(Unavailable):
        asyncio.run(eng.retrieve([Query(text="a")]))


def test_partial_reference_finds_it_first_with_text_and_scores():
    query = "Veltrix Industries makes the Quarn-7 pump"
    (hits,) = retrieve(engine(), [Query(text=query)], top_k=3, include_text=True)
    assert [h.id for h in hits][0] == "ref02"
    assert hits[0].text == REFERENCES[2]
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    (bare,) = retrieve(engine(), [Query(text=query)], top_k=3)
    assert [h.text for h in bare] == ["", "", ""]


def test_verbatim_reference_is_dropped_by_the_overlap_filter():
    (filtered,) = retrieve(engine(), [Query(text=REFERENCES[3])], top_k=3)
    assert "ref03" not in [h.id for h in filtered]
    assert len(filtered) == 3  # the next best took its place
    (unfiltered,) = retrieve(engine(max_overlap=1.0), [Query(text=REFERENCES[3])], top_k=3)
    assert unfiltered[0].id == "ref03"


def test_token_id_queries_match_text_queries():
    eng = engine()
    codec = TextCodec(byte_level_tokenizer())
    query = "Pell Andora teaches astronomy"
    by_text, by_ids = retrieve(eng, [Query(text=query), Query(token_ids=codec.encode(query))], top_k=4)
    assert [h.id for h in by_text] == [h.id for h in by_ids] and by_text[0].id == "ref06"


def test_top_k_zero_means_memories_per_chunk_and_batches_keep_order():
    queries = [Query(text="cheese market town"), Query(text="orchestra baroque music")]
    found = retrieve(engine(), queries)
    assert [len(h) for h in found] == [5, 5]
    assert found[0][0].id == "ref05" and found[1][0].id == "ref07"


def test_filter_searches_wider_when_the_best_candidates_are_all_dropped():
    query = " ".join(f"clause number {i} of a long query about nothing in particular." for i in range(12))
    pieces = [f"clause number {i} of a long query about nothing in particular." for i in range(12)]
    (hits,) = retrieve(engine(pieces + REFERENCES), [Query(text=query)], top_k=2)
    assert len(hits) == 2
    assert all(int(h.id[3:]) >= len(pieces) for h in hits)  # none of the contained pieces


def test_a_token_id_query_without_text_reads_no_memory():
    """A chunk of padding or special tokens was answered with whatever was nearest an empty embedding."""
    hits = retrieve(engine(), [Query(token_ids=[0, 1, 2, 0]), Query(token_ids=[223, 223, 201]),  # "  \\n"
                               Query(text="Quarn-7 pump")], top_k=2)
    assert [len(h) for h in hits] == [0, 0, 2]


def test_a_wider_search_judges_each_reference_once(monkeypatch):
    """Every round of widening judged again the candidates of the rounds before: a long query that
    quotes its neighbours cost about 0.8 s."""
    from memory3.services.text import engine as engine_module

    judged: list[tuple[int, ...]] = []
    real = engine_module.overlap

    def counting(reference, query):
        judged.append(tuple(reference))
        return real(reference, query)

    monkeypatch.setattr(engine_module, "overlap", counting)
    pieces = [f"clause number {i} of a long query about nothing in particular." for i in range(12)]
    retrieve(engine(pieces + REFERENCES), [Query(text=" ".join(pieces))], top_k=2)
    assert len(judged) == len(set(judged)) > 12 - 2  # the search widened, and no reference twice


def test_a_wider_search_stops_at_its_limit_or_when_the_index_has_no_more(monkeypatch):
    """A query whose nearest references it quotes was searched ever wider, to the whole index (at 10^8
    references, over a gigabyte of results for one query, every other request waiting); an approximate
    index that had no more for it was asked again, wider, for nothing."""
    from memory3.services.text import engine as engine_module

    pieces = [f"clause number {i} of a long query about nothing in particular." for i in range(40)]
    query = [Query(text=" ".join(pieces[:30]))]
    widths: list[int] = []
    real_search = VectorIndex.search

    def search(index, vectors, k):
        if len(vectors) == 1 and k > 1:  # not the engine's first search, at its start
            widths.append(k)
        return real_search(index, vectors, k)

    monkeypatch.setattr(VectorIndex, "search", search)
    (hits,) = retrieve(engine(pieces + REFERENCES), query, top_k=2)
    assert widths == [10, 40, 48] and len(hits) == 2  # widened until two survived the filter (to all 48)
    widths.clear()
    monkeypatch.setattr(engine_module, "MAX_SEARCH_WIDTH", 16)
    (hits,) = retrieve(engine(pieces + REFERENCES), query, top_k=2)
    assert widths == [10, 16] and len(hits) < 2  # at the limit: fewer than asked for

    def finds_little(index, vectors, k):  # an approximate index with only 10 candidates near the query
        return [found[:10] for found in search(index, vectors, k)]

    widths.clear()
    monkeypatch.setattr(VectorIndex, "search", finds_little)
    monkeypatch.setattr(engine_module, "MAX_SEARCH_WIDTH", 4096)
    retrieve(engine(pieces + REFERENCES), query, top_k=2)
    assert widths == [10, 40]  # 10 of 40 found: no wider search


def test_small_index_returns_what_it_has():
    (hits,) = retrieve(engine(REFERENCES[:2]), [Query(text="copper bridges of Lunmar")], top_k=10)
    assert len(hits) == 2


def test_metrics_count_queries():
    def count(name):
        return REGISTRY.get_sample_value(name) or 0.0

    before = count("memory3_retrieval_queries_total"), count("memory3_retrieval_latency_seconds_count")
    retrieve(engine(), [Query(text="pump"), Query(text="orchestra"), Query(text="river")], top_k=1)
    assert count("memory3_retrieval_queries_total") == before[0] + 3
    assert count("memory3_retrieval_latency_seconds_count") == before[1] + 1


def test_queue_gauges_follow_waiting_and_running_requests():
    """The autoscaler's signal: requests queued for a worker, with callers that gave up leaving it at once;
    latency counts a request's time in the queue."""
    gate = threading.Event()

    def sample(name):
        return REGISTRY.get_sample_value(name) or 0.0

    names = ("memory3_retrieval_requests_waiting", "memory3_retrieval_batches_running",
             "memory3_retrieval_queue_time_seconds_count", "memory3_retrieval_queue_time_seconds_sum",
             "memory3_retrieval_latency_seconds_sum")

    async def go():
        eng = TextEngine(resources, lambda: TrigramEmbedder(), max_concurrency=1)
        await eng.start()
        eng._embedder.gate = gate
        base = {n: sample(n) for n in names}
        first = asyncio.create_task(eng.retrieve([Query(text="pump")]))
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(eng.retrieve([Query(text=t)])) for t in ("river", "orchestra", "pell")]
        await asyncio.sleep(0.05)
        during = {n: sample(n) - base[n] for n in names}
        waiting[0].cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        after_cancel = sample(names[0]) - base[names[0]]
        await asyncio.sleep(0.2)
        gate.set()
        await first
        await asyncio.gather(*waiting[1:])
        return during, after_cancel, {n: sample(n) - base[n] for n in names}

    during, after_cancel, end = asyncio.run(go())
    assert during[names[0]] == 3 and during[names[1]] == 1
    assert after_cancel == 2
    assert end[names[0]] == 0 and end[names[1]] == 0
    assert end[names[2]] == 3  # the first request and the two that waited, one batch
    assert end[names[3]] >= 2 * 0.25  # the two waited for the gate
    assert end[names[4]] >= end[names[3]]


@pytest.mark.parametrize(("queries", "top_k", "message"), [
    ([], 0, "queries is empty"),
    ([Query(text="a")] * (MAX_QUERIES + 1), 0, f"257 queries in one request; at most {MAX_QUERIES}"),
    ([Query(text="a", token_ids=[5])], 0, r"queries\[0\] sets both of text and token_ids"),
    ([Query(text="a"), Query()], 0, r"queries\[1\] sets neither of text and token_ids"),
    ([Query(token_ids=[])], 0, "sets neither"),
    ([Query(text="  ")], 0, r"queries\[0\].text is empty"),
    ([Query(text="a")], -1, "top_k is -1; use 1..64"),
    ([Query(text="a")], 65, "top_k is 65"),
    ([Query(token_ids=[5, 100000])], 0, r"queries\[0\].token_ids\[1\] = 100000 is not a token id"),
    ([Query(text="é" * (MAX_TEXT_BYTES // 2 + 1))], 0, r"queries\[0\].text is 65538 bytes"),
    ([Query(token_ids=[5] * 20000)], 0, "at most 16384"),
    ([Query(token_ids=[70] * 16000)] * 3, 0, "48000 token ids in all; at most 32768 a request"),
    ([Query(text="a" * 60000)] * 20, 0, "1200000 bytes of text in all"),
    ([Query(text="\u200b\u200b\x00")], 0, r"queries\[0\].text is empty \(or only spaces and control"),
])
def test_bad_retrieval_input_says_what_to_fix(queries, top_k, message):
    eng = started(engine())
    with pytest.raises(InvalidInput, match=message):
        asyncio.run(eng.retrieve(queries, top_k))


def test_full_queue_is_resource_exhausted():
    gate = threading.Event()

    async def go():
        eng = TextEngine(resources, lambda: TrigramEmbedder(), max_concurrency=1, max_waiting=0)
        await eng.start()
        eng._embedder.gate = gate
        first = asyncio.create_task(eng.retrieve([Query(text="pump")]))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="already waiting"):
            await eng.retrieve([Query(text="orchestra")])
        gate.set()
        assert len((await first)[0]) == 5

    asyncio.run(go())


def test_cancelled_call_keeps_its_slot_until_the_work_ends():
    gate = threading.Event()

    async def go():
        eng = TextEngine(resources, lambda: TrigramEmbedder(), max_concurrency=1)
        await eng.start()
        eng._embedder.gate = gate
        first = asyncio.create_task(eng.retrieve([Query(text="pump")]))
        await asyncio.sleep(0.05)
        first.cancel()
        await asyncio.sleep(0.05)
        assert eng.busy  # the thread still runs: nothing else may start
        gate.set()
        await asyncio.sleep(0.2)
        assert not eng.busy
        assert len((await eng.retrieve([Query(text="orchestra")]))[0]) == 5

    asyncio.run(go())


def test_release_indexed_with_another_embedder_is_refused():
    eng = TextEngine(lambda: resources(embedder_name="all-MiniLM-L6-v2"), lambda: TrigramEmbedder())
    with pytest.raises(ReleaseError, match="indexed with 'all-MiniLM-L6-v2'"):
        asyncio.run(eng.start())
    assert not eng.ready


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="max_overlap"):
        engine(max_overlap=1.5)
    with pytest.raises(ValueError, match=r"^--max-concurrency must be at least 1 \(batches embedded at once\), got 0$"):
        engine(max_concurrency=0)


class FailingOn(TrigramEmbedder):
    """Fails any call that embeds `word`."""

    def __init__(self, word: str, gate=None) -> None:
        super().__init__(gate)
        self.word = word

    def embed(self, texts):
        if any(self.word in t for t in texts):
            self.calls += 1
            raise RuntimeError(f"cannot embed {self.word!r}")
        return super().embed(texts)


def test_requests_that_wait_are_embedded_together_and_answered_as_alone():
    gate = threading.Event()
    asks = [([Query(text="pump"), Query(text="river")], 2, False), ([Query(text="orchestra")], 1, True),
            ([Query(text="astronomy")], 0, False)]

    async def go():
        eng = TextEngine(resources, lambda: TrigramEmbedder(), max_concurrency=1)
        await eng.start()
        eng._embedder.gate = gate
        first = asyncio.create_task(eng.retrieve([Query(text="glassblower")]))
        await asyncio.sleep(0.05)  # the worker is busy with the first request; the others wait
        waiting = [asyncio.create_task(eng.retrieve(q, k, text)) for q, k, text in asks]
        await asyncio.sleep(0.05)
        calls = eng._embedder.calls
        gate.set()
        await first
        merged = await asyncio.gather(*waiting)
        return eng._embedder.calls - calls, merged

    extra_calls, merged = asyncio.run(go())
    assert extra_calls == 1  # three waiting requests, one embedding call
    for (queries, k, text), got in zip(asks, merged, strict=True):
        assert got == retrieve(engine(), queries, k, text)
    assert merged[1][0][0].text and not merged[0][0][0].text


def test_a_failing_request_in_a_merged_batch_fails_alone():
    gate = threading.Event()

    async def go():
        eng = TextEngine(resources, lambda: FailingOn("boom"), max_concurrency=1)
        await eng.start()
        eng._embedder.gate = gate
        first = asyncio.create_task(eng.retrieve([Query(text="pump")]))
        await asyncio.sleep(0.05)
        good = asyncio.create_task(eng.retrieve([Query(text="orchestra")], 1))
        bad = asyncio.create_task(eng.retrieve([Query(text="boom")], 1))
        gone = asyncio.create_task(eng.retrieve([Query(text="river")], 1))
        await asyncio.sleep(0.05)
        gone.cancel()  # its caller gave up while it waited: it is not run
        gate.set()
        await first
        with pytest.raises(RuntimeError, match="cannot embed 'boom'"):
            await bad
        return (await good)[0], eng

    found, eng = asyncio.run(go())
    assert [r.id for r in found] == ["ref03"]
    assert not eng.busy and not eng._queue


def test_identical_queries_are_embedded_once():
    embedder = TrigramEmbedder()
    calls = []
    real = embedder.embed

    def counting(texts):
        calls.append(list(texts))
        return real(texts)

    embedder.embed = counting
    hits = retrieve(engine(embedder=embedder), [Query(text="Quarn-7 pump")] * 3 + [Query(text="Lunmar")], top_k=2)
    assert hits[0] == hits[1] == hits[2] and hits[3] != hits[0]
    assert calls[-1] == ["Quarn-7 pump", "Lunmar"]


def test_an_index_whose_rows_do_not_follow_the_table_is_refused():
    """A table in another order than the index (rows moved by one) turned SERVING and answered every
    query with another reference's id and text."""
    def shifted():
        good = resources()
        ids = list(good.index.iter_ids())
        texts = {rid: good.texts[ids[(i + 1) % len(ids)]] for i, rid in enumerate(ids)}
        return TextResources(release="unit", codec=good.codec, index=good.index, texts=texts, default_top_k=5,
                             embedder_name=good.embedder_name)

    with pytest.raises(ReleaseError, match=r"only \d of 8 sampled references find themselves"):
        asyncio.run(TextEngine(shifted, lambda: TrigramEmbedder()).start())
    started(engine())  # the table in its order passes


def test_start_waits_for_an_object_store_that_does_not_answer_yet(caplog):
    """A text pod started during a short outage of the object store ended at once (and restarted in a
    crash loop ever slower to come back), where the memory service and the decoder wait for it."""
    import logging

    from memory3.services.release.manifest import ReleaseNotFound
    from memory3.services.storage.object_store import StoreUnavailable

    tries = []

    def load():
        tries.append(1)
        if len(tries) < 3:
            raise StoreUnavailable("get releases/unit/manifest.json: cannot reach the object store at s3:9000")
        return resources()

    eng = TextEngine(load, TrigramEmbedder, open_retry_s=0.01, open_max_retry_s=0.02)
    with caplog.at_level(logging.WARNING, logger="memory3.text"):
        asyncio.run(eng.start())
    assert eng.ready and len(tries) == 3
    assert [r.getMessage().split(": ")[0] for r in caplog.records] == ["release not open yet"] * 2

    def missing():  # anything but an outage still ends the start
        raise ReleaseNotFound("release 'unit' not found")

    with pytest.raises(ReleaseNotFound):
        asyncio.run(TextEngine(missing, TrigramEmbedder, open_retry_s=0.01).start())
