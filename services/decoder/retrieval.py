"""Where the decoder's memories come from: an interface, and an in-process implementation.

The engine only needs two awaitables: retrieve references for some token-id queries, and fetch
their memories. In production they are the text and memory services (`remote.py`); in-process
(tests, benchmarks, `memory3 generate --release` without servers) they read the release directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from memory3.model.memory import ExplicitMemory
from memory3.model.memory_format import MemoryFormatError

from ..rpc.errors import DataLoss, DeadlineExceeded, ResourceExhausted, Unavailable
from ..text.engine import INFERENCE_MAX_OVERLAP, Query, TextEngine, release_resources


@dataclass(frozen=True)
class RetrievedReference:
    id: str
    score: float
    text: str = ""


class Retrieval(Protocol):
    async def retrieve(self, queries: list[list[int]], top_k: int,
                       include_text: bool) -> list[list[RetrievedReference]]:
        """Per token-id query, the best references (best first), overlap filter applied."""

    async def fetch(self, ids: Sequence[str]) -> list[ExplicitMemory]:
        """The memories of these reference ids, in order, validated."""

    # A retrieval that keeps decoded memories in RAM may also offer
    #     def cached(self, ids: Sequence[str]) -> list[ExplicitMemory] | None
    # answering at once when it holds every one of `ids` (None otherwise): callers that batch
    # fetches (`CoalescingRetrieval`) then skip their batching window for memories already here.
    # A retrieval that batches callers (`CoalescingRetrieval`) also offers
    #     async def retrieve_by(self, queries, top_k, include_text, needed_in_s: float)
    # for a caller that needs the answer only `needed_in_s` seconds from now, and so can wait
    # for others to share its call.


class LocalRetrieval:
    """Retrieval straight from an opened release: its index, embedder and memory bank.

    References are searched and filtered by the text service's own engine, so that a decoder
    without a text service retrieves what one with it would: a search of its own kept the tokens of
    every reference it ever judged (the whole knowledge base, in time), searched no wider when the
    overlap filter left fewer than top_k, and gave a chunk of nothing (spaces, padding) the
    references nearest an empty embedding, where the service gives none.
    """

    def __init__(self, release, embedder, *, max_overlap: float | None = None) -> None:
        self.release = release
        resources = release_resources(release)  # blocking, as opening the index always was
        # The decoder's own streams are its only callers, and CoalescingRetrieval batches them.
        self.engine = TextEngine(lambda: resources, lambda: embedder, max_waiting=1 << 20,
                                 max_overlap=INFERENCE_MAX_OVERLAP if max_overlap is None else max_overlap)
        self._started: asyncio.Future | None = None

    async def _start(self) -> None:
        """Check the release against the embedder once, on the first call (every call waits for it)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self.engine.start())
        await asyncio.shield(self._started)

    async def retrieve(self, queries: list[list[int]], top_k: int,
                       include_text: bool) -> list[list[RetrievedReference]]:
        await self._start()
        found = await self.engine.retrieve([Query(token_ids=q) for q in queries], top_k, include_text)
        return [[RetrievedReference(r.id, r.score, r.text) for r in hits] for hits in found]

    async def fetch(self, ids: Sequence[str]) -> list[ExplicitMemory]:
        try:
            return await asyncio.to_thread(self.release.fetch_memories, list(ids))
        except MemoryFormatError as e:  # corrupt, or another memory than the table's: as the memory service says
            raise DataLoss(f"a memory failed validation: {e}") from e


class CoalescingRetrieval:
    """Merges concurrent retrievals (and fetches) into one call each.

    Streams reach chunk boundaries together (a batch started together stays in step), and each
    would otherwise cost the text service one embedding pass and the memory service one round
    trip. Calls that arrive within `window_s` of the first become one batched call; with a
    single caller the added latency is the window alone. When a merged call fails, each caller's
    part is retried alone, so one bad query or corrupt memory fails only the stream that asked.
    A fetch whose memories the inner retrieval already holds decoded (its `cached`, when it has
    one) is answered at once: no window, no task, no round trip.

    Every call costs the decoder's cores a round trip's work (and the switches between its
    threads), so a caller that needs its answer later (`retrieve_by`: a chunk's memories while
    the stream decodes its last tokens, a prompt's while the stream would queue for a row) holds
    its batch open longer, up to `max_wait_s`, leaving twice the recent latency of a call for the
    call itself. A batch goes when its most urgent caller's wait is over. A call none of its callers
    waits for any more is cancelled (`_abandoned`).
    """

    def __init__(self, inner: Retrieval, *, window_s: float = 0.002, max_wait_s: float = 0.05,
                 max_items: int = 256) -> None:
        self.inner, self.window_s, self.max_wait_s, self.max_items = inner, window_s, max_wait_s, max_items
        self._cached = getattr(inner, "cached", None)
        self._pending: dict[tuple, _Batch] = {}
        self._tasks: set[asyncio.Task] = set()
        self.latency_s: float | None = None  # moving average of the inner retrieve call's duration

    async def retrieve(self, queries: list[list[int]], top_k: int,
                       include_text: bool) -> list[list[RetrievedReference]]:
        return await self._submit(("retrieve", top_k, include_text), list(queries), self.window_s)

    async def retrieve_by(self, queries: list[list[int]], top_k: int, include_text: bool,
                          needed_in_s: float) -> list[list[RetrievedReference]]:
        """`retrieve` for a caller that needs the answer `needed_in_s` seconds from now."""
        wait_s = self.window_s
        if self.latency_s is not None:
            wait_s = max(wait_s, min(self.max_wait_s, needed_in_s - 2 * self.latency_s))
        return await self._submit(("retrieve", top_k, include_text), list(queries), wait_s)

    async def fetch(self, ids: Sequence[str]) -> list[ExplicitMemory]:
        found = self._cached(ids) if self._cached is not None else None
        return found if found is not None else await self._submit(("fetch",), list(ids), self.window_s)

    async def _submit(self, key: tuple, items: list, wait_s: float):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        batch = self._pending.get(key)
        if batch is not None and batch.items + len(items) > self.max_items:
            self._flush(key)  # it goes without this call: together they pass what one request may carry
            batch = None
        if batch is None:
            batch = self._pending[key] = _Batch()
        batch.calls.append((items, future))
        batch.items += len(items)
        if batch.items >= self.max_items:
            self._flush(key)
        elif loop.time() + wait_s < batch.flush_at:
            if batch.timer is not None:
                batch.timer.cancel()
            batch.flush_at = loop.time() + wait_s
            batch.timer = loop.call_at(batch.flush_at, self._flush, key)
        try:
            return await future
        except asyncio.CancelledError:
            self._abandoned(key, batch)
            raise

    def _abandoned(self, key: tuple, batch: _Batch) -> None:
        """A caller left (its client hung up, its deadline passed). Once every caller of a batch has,
        nobody needs its call: a batch not sent yet is dropped, and a call in flight is cancelled, which
        cancels the RPC, so that the text or memory service stops working for nobody (it drops a
        cancelled caller from its queue)."""
        if not all(future.done() for _, future in batch.calls):
            return
        if self._pending.get(key) is batch:
            del self._pending[key]
            if batch.timer is not None:
                batch.timer.cancel()
        elif batch.task is not None:
            batch.task.cancel()

    def _flush(self, key: tuple) -> None:
        batch = self._pending.pop(key, None)
        if batch is not None:
            if batch.timer is not None:
                batch.timer.cancel()
            task = batch.task = asyncio.ensure_future(self._run(key, batch.calls))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, key: tuple, items: list) -> list:
        if key[0] == "retrieve":
            start = time.monotonic()
            found = await self.inner.retrieve(items, key[1], key[2])
            took = time.monotonic() - start
            self.latency_s = took if self.latency_s is None else self.latency_s + 0.2 * (took - self.latency_s)
            return found
        unique = list(dict.fromkeys(items))
        memories = dict(zip(unique, await self.inner.fetch(unique), strict=True))
        return [memories[i] for i in items]

    async def _run(self, key: tuple, batch: list[tuple[list, asyncio.Future]]) -> None:
        """Answer every caller of `batch`, whatever happens: a call cut short (its gRPC channel closed
        under it raises CancelledError, as does this task cancelled) left its callers waiting forever,
        each stream holding its request open."""
        try:
            await self._answer(key, batch)
        except BaseException as e:
            for _, future in batch:
                _settle(future, error=e)
            raise

    async def _answer(self, key: tuple, batch: list[tuple[list, asyncio.Future]]) -> None:
        batch = [(items, future) for items, future in batch if not future.done()]  # callers that left ask nothing
        if not batch:
            return
        try:
            merged = await self._call(key, [item for items, _ in batch for item in items])
        except Exception as e:  # noqa: BLE001 - handed to the callers
            if len(batch) == 1 or isinstance(e, (Unavailable, DeadlineExceeded, ResourceExhausted)):
                # An outage or an overload fails every part alike: asking again, part by part, would
                # only make each caller wait for it once more (a hung service: twice the timeout),
                # and multiply the requests an overloaded service refuses.
                for _, future in batch:
                    _settle(future, error=e)
                return
            # Something in the batch was refused (e.g. a corrupt memory): each part on its own, so
            # that the refusal reaches only its caller.
            batch = [(items, future) for items, future in batch if not future.done()]
            results = await asyncio.gather(*(self._call(key, items) for items, _ in batch), return_exceptions=True)
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, **({"error": result} if isinstance(result, BaseException) else {"value": result}))
            return
        start = 0
        for items, future in batch:
            _settle(future, value=merged[start : start + len(items)])
            start += len(items)


@dataclass
class _Batch:
    """Calls waiting to go as one: their items, and when the batch goes (event-loop time); then the call."""

    calls: list[tuple[list, asyncio.Future]] = field(default_factory=list)
    items: int = 0
    flush_at: float = float("inf")
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task | None = None  # the call, once sent


def _settle(future: asyncio.Future, *, value=None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if isinstance(error, asyncio.CancelledError):  # not the caller's own cancellation: the call's
        error = Unavailable("the retrieval was cut short before it answered (its connection closed); retry")
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
