"""Tokenization and retrieval for one release: protocol-neutral, asyncio.

The engine owns what a release needs to answer a query: its tokenizer, the embedder its index was
built with, the FAISS index and the reference texts. Loading (download, embedder weights, a
warm-up embedding) happens in `start()`; until it has finished every call answers UNAVAILABLE, so
the server can listen (and report NOT_SERVING) while the release loads.

Retrieval follows the paper's inference recipe: embed the queries in one batch, search, and drop
every reference whose LCS overlap with its query exceeds 2/3 (a reference that merely restates
the query adds nothing). Embedding, searching and the overlap filter are CPU-bound, so they run in
worker threads, at most `max_concurrency` batches at a time, with a bounded queue in front.

Requests that wait for a worker are merged: when one frees, it takes every waiting request (up to
MAX_QUERIES queries) as one batch, as TEI and Triton batch dynamically. An idle service answers a
lone request at once; a busy one embeds many queries per call, which costs far less per query
than one call each (the embedder's matrix products are too small to fill the CPU at batch 1).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from memory3.model.tokenizer import TextCodec

from ..release.manifest import ReleaseError
from ..release.publish import INDEX_FILE, REFERENCES_FILE, TOKENIZER_KEY
from ..release.reader import Release
from ..retrieval.index import IndexShard, VectorIndex
from ..rpc.errors import InvalidInput, ResourceExhausted, Unavailable
from ..rpc.metrics import (
    RETRIEVAL_BATCHES_RUNNING,
    RETRIEVAL_LATENCY,
    RETRIEVAL_QUERIES,
    RETRIEVAL_QUEUE_TIME,
    RETRIEVAL_REQUESTS_WAITING,
)
from ..storage.object_store import ObjectStore, StoreUnavailable
from ..trainer.overlap import EVAL_MAX_OVERLAP, overlap

log = logging.getLogger("memory3.text")

# The paper drops retrieved references overlapping the query by more than 2/3 at inference
# (training uses 90%, see trainer/overlap.py).
INFERENCE_MAX_OVERLAP = EVAL_MAX_OVERLAP
MAX_QUERIES = 256
MAX_TOP_K = 64
MAX_TEXT_BYTES = 64 << 10  # per text (a query, or a Tokenize request)
MAX_TOKEN_IDS = 16384  # per token-id query, or a Detokenize request
# Per Retrieve request, all its queries together: the work of one request (the filter's cost grows with
# a query's length) must stay well inside a client's deadline, as requests run one after another.
MAX_REQUEST_TOKEN_IDS = 32768  # 512 of the decoder's 64-token chunks
MAX_REQUEST_TEXT_BYTES = 1 << 20
# Extra candidates searched per query so that the overlap filter rarely leaves fewer than top_k;
# when it does, the query is searched again with a wider net (see _search_filtered).
SEARCH_MARGIN = 8
# The widest that search goes: a query whose nearest references its text mostly contains (boilerplate
# a knowledge base repeats) was searched ever wider, to the whole index (at 10^8 references, over a
# gigabyte of results for one query, while every other request waited); past it, fewer than top_k.
MAX_SEARCH_WIDTH = 4096
REFERENCE_TOKEN_CACHE = 100_000


class EmbedderLike(Protocol):
    """What the engine needs of an embedder (retrieval/embedder.py's, or a test's)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Query:
    """Exactly one of `text` and `token_ids` (ids of the release's tokenizer)."""

    text: str | None = None
    token_ids: Sequence[int] | None = None


class Retrieved(NamedTuple):
    id: str  # reference id, also the memory id in the release's bank
    score: float  # cosine similarity of query and reference embeddings
    text: str  # the reference text, or "" when it was not requested


@dataclass(frozen=True)
class TextResources:
    """What a release provides to the engine."""

    release: str
    codec: TextCodec
    index: VectorIndex
    texts: dict[str, str]  # reference id -> text, covering every id of the index
    default_top_k: int  # memories per chunk, used when a request asks for top_k = 0
    embedder_name: str  # the embedder the index was built with
    shard: IndexShard = IndexShard(0, 1)  # the part of the release's index `index` holds


@dataclass(eq=False)  # a request is itself: the queue finds it by identity
class _Request:
    queries: list[Query]
    k: int
    include_text: bool
    result: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class TextEngine:
    def __init__(self, load: Callable[[], TextResources], embedder_factory: Callable[[], EmbedderLike], *,
                 max_overlap: float = INFERENCE_MAX_OVERLAP, max_concurrency: int = 1,
                 max_waiting: int = 64, open_retry_s: float = 1.0, open_max_retry_s: float = 15.0) -> None:
        """`load` and `embedder_factory` are blocking; `start()` runs them in worker threads. `load` is
        tried again while the object store cannot be reached, after `open_retry_s`, doubled up to
        `open_max_retry_s`, as the memory service and the decoder wait for it."""
        if not 0.0 <= max_overlap <= 1.0:
            raise ValueError(f"max_overlap must be in [0, 1] (1 disables the overlap filter), got {max_overlap}")
        if max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1 (batches embedded at once), got {max_concurrency}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 (requests queued for a worker), got {max_waiting}")
        self._load, self._embedder_factory = load, embedder_factory
        self.open_retry_s, self.open_max_retry_s = open_retry_s, open_max_retry_s
        self.max_overlap = max_overlap
        self.max_waiting = max_waiting
        self.max_concurrency = max_concurrency
        self._running = 0  # batches in worker threads
        self._queue: list[_Request] = []  # requests waiting for a worker
        self._resources: TextResources | None = None
        self._embedder: EmbedderLike | None = None
        self._reference_tokens = functools.lru_cache(maxsize=REFERENCE_TOKEN_CACHE)(self._encode_reference)

    @classmethod
    def for_release(cls, store: ObjectStore, name: str, cache_dir: Path, *,
                    embedder_factory: Callable[[], EmbedderLike] | None = None, shard: IndexShard = IndexShard(0, 1),
                    **options) -> TextEngine:
        """An engine that serves release `name` (its index shard `shard`) from the object store
        (downloaded on `start()`)."""
        return cls(functools.partial(load_release_resources, store, name, cache_dir, shard),
                   embedder_factory or _default_embedder, **options)

    # ---- lifecycle ----

    async def start(self) -> None:
        """Load the release and the embedder, check they agree, and embed once (the first call is slow)."""
        resources, embedder = await asyncio.gather(self._load_retrying(), asyncio.to_thread(self._embedder_factory))
        if resources.embedder_name != embedder.name:
            raise ReleaseError(f"release {resources.release!r} was indexed with {resources.embedder_name!r} "
                               f"but this service embeds with {embedder.name!r}")
        if resources.index.index.d != embedder.dim:
            raise ReleaseError(f"release {resources.release!r}: index dimension {resources.index.index.d} "
                               f"differs from the embedder's {embedder.dim}")
        missing = next((rid for rid in resources.index.iter_ids() if rid not in resources.texts), None)
        if missing is not None:
            raise ReleaseError(f"release {resources.release!r}: index id {missing!r} has no reference text")
        await asyncio.to_thread(_check_rows, resources, embedder)  # also the first, slow, embedding
        self._resources, self._embedder = resources, embedder
        log.info("release %r loaded: %d references%s, embedder %s", resources.release, len(resources.index.ids),
                 f" (index shard {resources.shard})" if resources.shard.count > 1 else "", embedder.name)

    async def _load_retrying(self) -> TextResources:
        """The release, once the object store answers: a text pod started during an outage of a few
        seconds ended at once, and restarted in a crash loop ever slower to come back."""
        delay = self.open_retry_s
        while True:
            try:
                return await asyncio.to_thread(self._load)
            except StoreUnavailable as e:
                log.warning("release not open yet: %s; retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.open_max_retry_s)

    @property
    def ready(self) -> bool:
        return self._resources is not None

    @property
    def release(self) -> str:
        return self._ready().release

    @property
    def shard(self) -> IndexShard:
        return self._ready().shard

    @property
    def default_top_k(self) -> int:
        return self._ready().default_top_k

    def _ready(self) -> TextResources:
        if self._resources is None:
            raise Unavailable("the text service is still loading its release; retry once health reports SERVING")
        return self._resources

    # ---- tokenizer ----

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        codec = self._ready().codec
        _check_text_size(text, "text")
        ids = codec.encode(text)
        return [codec.bos_id, *ids] if add_bos else ids

    def detokenize(self, ids: Sequence[int]) -> str:
        codec = self._ready().codec
        if len(ids) > MAX_TOKEN_IDS:
            raise InvalidInput(f"token_ids has {len(ids)} ids; at most {MAX_TOKEN_IDS} per request: split it")
        self._check_ids(ids, "token_ids")
        return codec.decode(ids)

    # ---- retrieval ----

    async def retrieve(self, queries: Sequence[Query], top_k: int = 0,
                       include_text: bool = False) -> list[list[Retrieved]]:
        """Per query, up to top_k references best first (0: the release's memories per chunk)."""
        resources = self._ready()
        k = self._check_retrieval(queries, top_k)
        if self.busy and (waiting := self._waiting()) >= self.max_waiting:
            raise ResourceExhausted(f"{waiting} retrieval requests are already waiting; retry later "
                                    "or add text-service replicas")
        request = _Request(list(queries), k, include_text, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        RETRIEVAL_REQUESTS_WAITING.inc()
        # A caller that gives up leaves the queue (and the gauge the autoscaler reads) at once.
        request.result.add_done_callback(functools.partial(self._unqueue, request))
        self._dispatch(resources)
        # A caller that gives up cancels its result only: a worker already running its batch runs to
        # the end, so no more than max_concurrency batches ever run at once.
        out = await request.result
        RETRIEVAL_QUERIES.inc(len(queries))
        return out

    def _waiting(self) -> int:
        """How many requests wait for a worker, not counting those whose callers gave up (a deadline
        that passed while a long batch ran): they held their places until the next batch began, and a
        service with nobody waiting refused every new request as overloaded."""
        return sum(not request.result.done() for request in self._queue)

    def _unqueue(self, request: _Request, _result: asyncio.Future | None = None) -> None:
        """Take `request` off the queue, if it is still there: a worker took it, or its caller gave up."""
        if request in self._queue:
            self._queue.remove(request)
            RETRIEVAL_REQUESTS_WAITING.dec()

    @property
    def busy(self) -> bool:
        """Every worker is running a batch: a new request waits."""
        return self._running >= self.max_concurrency

    def _dispatch(self, resources: TextResources) -> None:
        """Start a batch of the waiting requests on each free worker."""
        while self._queue and not self.busy:
            batch, n = [], 0
            while self._queue and (not batch or n + len(self._queue[0].queries) <= MAX_QUERIES):
                request = self._queue[0]
                self._unqueue(request)
                if not request.result.done():  # else its caller gave up while it waited
                    batch.append(request)
                    n += len(request.queries)
            if not batch:
                return
            now = time.perf_counter()
            for request in batch:
                RETRIEVAL_QUEUE_TIME.observe(now - request.arrived)
            self._running += 1
            RETRIEVAL_BATCHES_RUNNING.inc()
            work = asyncio.ensure_future(asyncio.to_thread(self._retrieve_requests, resources, batch))
            work.add_done_callback(functools.partial(self._batch_done, resources, batch))

    def _batch_done(self, resources: TextResources, batch: list[_Request], work: asyncio.Future) -> None:
        self._running -= 1
        RETRIEVAL_BATCHES_RUNNING.dec()
        # _retrieve_requests never raises (each request has its outcome); the thread's future is
        # cancelled only when the event loop shuts down.
        outcomes = ([Unavailable("the text service is shutting down")] * len(batch) if work.cancelled()
                    else work.result())
        now = time.perf_counter()
        for request, outcome in zip(batch, outcomes, strict=True):
            RETRIEVAL_LATENCY.observe(now - request.arrived)
            if request.result.done():
                continue
            if isinstance(outcome, BaseException):
                request.result.set_exception(outcome)
            else:
                request.result.set_result(outcome)
        self._dispatch(resources)

    def _retrieve_requests(self, resources: TextResources,
                           batch: list[_Request]) -> list[list[list[Retrieved]] | BaseException]:
        """Blocking: one embedding call for the whole batch. If it fails, each request is tried
        alone, so that one request's failure is its own."""
        try:
            return self._retrieve_merged(resources, batch)
        except Exception as e:  # noqa: BLE001 - handed to the callers
            if len(batch) == 1:
                return [e]
        outcomes: list[list[list[Retrieved]] | BaseException] = []
        for request in batch:
            try:
                outcomes += self._retrieve_merged(resources, [request])
            except Exception as e:  # noqa: BLE001 - handed to its caller
                outcomes.append(e)
        return outcomes

    def _check_retrieval(self, queries: Sequence[Query], top_k: int) -> int:
        if not queries:
            raise InvalidInput("queries is empty: send at least one query")
        if len(queries) > MAX_QUERIES:
            raise InvalidInput(f"{len(queries)} queries in one request; at most {MAX_QUERIES}: split the batch")
        if top_k < 0 or top_k > MAX_TOP_K:
            raise InvalidInput(f"top_k is {top_k}; use 1..{MAX_TOP_K}, or 0 for the release's memories per chunk")
        ids = sum(len(q.token_ids) for q in queries if q.token_ids is not None)
        if ids > MAX_REQUEST_TOKEN_IDS:
            raise InvalidInput(f"the queries hold {ids} token ids in all; at most {MAX_REQUEST_TOKEN_IDS} a request: "
                               "split the batch")
        text_bytes = sum(len(q.text.encode()) for q in queries if q.text is not None)
        if text_bytes > MAX_REQUEST_TEXT_BYTES:
            raise InvalidInput(f"the queries hold {text_bytes} bytes of text in all; at most "
                               f"{MAX_REQUEST_TEXT_BYTES} a request: split the batch")
        for i, q in enumerate(queries):
            has_text, has_ids = q.text is not None, q.token_ids is not None and len(q.token_ids) > 0
            if has_text == has_ids:
                which = "both" if has_text else "neither"
                raise InvalidInput(f"queries[{i}] sets {which} of text and token_ids; set exactly one")
            if has_text:
                if not _has_content(q.text):
                    raise InvalidInput(f"queries[{i}].text is empty (or only spaces and control characters); "
                                       "give the text to retrieve for")
                _check_text_size(q.text, f"queries[{i}].text")
            else:
                if len(q.token_ids) > MAX_TOKEN_IDS:
                    raise InvalidInput(f"queries[{i}].token_ids has {len(q.token_ids)} ids; at most "
                                       f"{MAX_TOKEN_IDS}: retrieve per chunk")
                self._check_ids(q.token_ids, f"queries[{i}].token_ids")
        return top_k or self._ready().default_top_k

    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        resources = self._ready()
        vocab = resources.codec.vocab_size
        array = np.asarray(ids, dtype=np.int64)
        bad = np.flatnonzero((array < 0) | (array >= vocab))
        if bad.size:
            j = int(bad[0])
            raise InvalidInput(f"{what}[{j}] = {int(array[j])} is not a token id of release {resources.release!r} "
                               f"(vocabulary 0..{vocab - 1})")

    def _retrieve_merged(self, resources: TextResources, batch: list[_Request]) -> list[list[list[Retrieved]]]:
        """Blocking: embed every request's queries in one call, then search each request's own."""
        codec = resources.codec
        queries = [q for request in batch for q in request.queries]
        texts = [q.text if q.text is not None else codec.decode(q.token_ids) for q in queries]
        tokens = [_packed(q.token_ids if q.token_ids else codec.encode(q.text)) for q in queries]
        position = {text: i for i, text in enumerate(dict.fromkeys(texts))}  # streams sharing a prompt send
        embedded = np.asarray(self._embedder.embed(list(position)))        # the same chunks: embedded once
        vectors = embedded if len(position) == len(texts) else embedded[[position[t] for t in texts]]
        out, start = [], 0
        for request in batch:
            end = start + len(request.queries)
            found = self._search_filtered(resources.index, vectors[start:end], tokens[start:end], request.k)
            # A chunk of padding, special tokens or spaces (the decoder sends every chunk) has nothing to
            # retrieve for: it reads no memory, rather than whichever are nearest an empty embedding.
            found = [hits if _has_content(text) else [] for hits, text in zip(found, texts[start:end], strict=True)]
            out.append([[Retrieved(rid, score, resources.texts[rid] if request.include_text else "")
                         for rid, score in hits] for hits in found])
            start = end
        return out

    def _search_filtered(self, index: VectorIndex, vectors: np.ndarray, tokens: list[str],
                         k: int) -> list[list[tuple[str, float]]]:
        """Search k + margin; a query left with fewer than k after the filter is searched again, four
        times wider, up to MAX_SEARCH_WIDTH, and not once a search found fewer than it asked for: an
        approximate index (IVF, HNSW) that has no more for the query would only be asked again."""
        limit = min(len(index.ids), max(MAX_SEARCH_WIDTH, k + SEARCH_MARGIN))
        out: list[list[tuple[str, float]]] = [[] for _ in tokens]
        verdicts: list[dict[str, bool]] = [{} for _ in tokens]  # per query: each reference judged once
        todo = list(range(len(tokens)))
        width = k + SEARCH_MARGIN
        while todo:
            hits = index.search(vectors[todo], width)
            again = []
            for qi, found in zip(todo, hits, strict=True):
                out[qi] = self._keep(found, tokens[qi], k, verdicts[qi])
                if len(out[qi]) < k and width < limit and len(found) == width:
                    again.append(qi)
            todo, width = again, min(width * 4, limit)
        return out

    def _keep(self, found: list[tuple[str, float]], query_tokens: str, k: int,
              verdicts: dict[str, bool]) -> list[tuple[str, float]]:
        """Best first, skipping references that overlap the query too much; stops once k are kept.
        `verdicts` keeps each reference's judgement for the query: a wider search sees them again."""
        kept = []
        for rid, score in found:
            if rid not in verdicts:
                verdicts[rid] = self.max_overlap >= 1.0 or \
                    overlap(self._reference_tokens(rid), query_tokens) <= self.max_overlap
            if verdicts[rid]:
                kept.append((rid, score))
                if len(kept) == k:
                    break
        return kept

    def _encode_reference(self, rid: str) -> str:
        resources = self._ready()
        return _packed(resources.codec.encode(resources.texts[rid]))


def load_release_resources(store: ObjectStore, name: str, cache_dir: Path,
                           shard: IndexShard = IndexShard(0, 1)) -> TextResources:
    """Blocking: download (or reuse a verified copy of) the release and keep what retrieval needs:
    with `shard`, that shard's rows of the index and their texts only, loaded in the memory of the
    shard, and cut once (`Release.index_shard`, `Release.reference_shard`)."""
    # No weights; for a shard, the index and the table only if the shard is cut here.
    files = {TOKENIZER_KEY} | ({INDEX_FILE, REFERENCES_FILE} if shard.count == 1 else set())
    return release_resources(Release.open(store, name, cache_dir, only=files), shard)


def release_resources(release: Release, shard: IndexShard = IndexShard(0, 1)) -> TextResources:
    """Blocking: what retrieval needs of an opened release (see `load_release_resources`)."""
    ids, texts = [], {}
    rows = release.rows() if shard.count == 1 else release.reference_shard(shard)  # the whole table: row by row
    for reference in rows:
        ids.append(reference["id"])
        texts[reference["id"]] = reference["text"]
    return TextResources(
        release=release.name, codec=release.text_codec(), index=release.index_shard(shard, ids), texts=texts,
        default_top_k=int(release.manifest.conventions["mems_per_chunk"]),
        embedder_name=str(release.manifest.index["embedder"]), shard=shard)


def _check_rows(resources: TextResources, embedder: EmbedderLike, sample: int = 8) -> None:
    """References spread over the index must find themselves first. The index maps rows to ids by
    the reference table's order, which no checksum covers: a table in another order (rows moved by
    one) served every retrieval another reference's id, text and memory. Half of them suffices (an
    approximate index, or a text that differs from another only in case, may rank one elsewhere)."""
    ids = resources.index.ids  # (N,) bytes
    if not len(ids):
        return
    chosen = [rid.decode() for rid in ids[:: max(1, len(ids) // sample)][:sample]]
    found = resources.index.search(np.asarray(embedder.embed([resources.texts[rid] for rid in chosen])), 1)
    hits = sum(bool(top) and top[0][0] == rid for rid, top in zip(chosen, found, strict=True))
    if 2 * hits < len(chosen):
        raise ReleaseError(f"release {resources.release!r}: only {hits} of {len(chosen)} sampled references find "
                           "themselves in the index: its rows do not follow the reference table's order")


def _packed(token_ids: Sequence[int]) -> str:
    """Token ids as the overlap filter compares them: one character per id. The cache of reference
    tokens held tuples of ints, 4.6 KB a 128-token reference with a real vocabulary (ids past 256
    are objects of their own), about 470 MB once full; a string holds them in 2 to 4 bytes each, and
    rapidfuzz compares strings two to three times as fast as sequences of ints."""
    return "".join(map(chr, token_ids))


def _default_embedder() -> EmbedderLike:
    from ..retrieval.embedder import Embedder

    return Embedder()


# Characters that carry no meaning to embed: spaces, controls, format (zero-width) and unassigned
# code points, surrogates, and U+FFFD (what a stray byte-level token decodes to).
_NO_CONTENT = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}


def _has_content(text: str) -> bool:
    """Whether `text` holds anything to retrieve for: a query of none (padding, `<s>` alone, zero-width
    spaces) was answered with whatever references happen to be nearest to an empty embedding."""
    return any(ch != "\ufffd" and not ch.isspace() and unicodedata.category(ch) not in _NO_CONTENT for ch in text)


def _check_text_size(text: str, what: str) -> None:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise InvalidInput(f"{what} is {size} bytes; at most {MAX_TEXT_BYTES} bytes (64 KiB): send less text")
