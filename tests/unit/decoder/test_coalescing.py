import asyncio
import time

import pytest

from memory3.services.decoder.retrieval import CoalescingRetrieval, RetrievedReference
from memory3.services.rpc.errors import DataLoss, ResourceExhausted, Unavailable


class Recorder:
    def __init__(self) -> None:
        self.retrieve_calls: list[int] = []
        self.fetch_calls: list[list[str]] = []

    async def retrieve(self, queries, top_k, include_text):
        self.retrieve_calls.append(len(queries))
        return [[RetrievedReference(f"r{sum(q)}", 1.0)] for q in queries]

    async def fetch(self, ids):
        self.fetch_calls.append(list(ids))
        if "corrupt" in ids:
            raise DataLoss("memory 'corrupt' failed validation")
        return [f"memory-{i}" for i in ids]


def test_concurrent_calls_become_one_and_results_go_back_in_order():
    inner = Recorder()
    coalescing = CoalescingRetrieval(inner, window_s=0.01)

    async def main():
        return await asyncio.gather(coalescing.retrieve([[1], [2]], 5, False), coalescing.retrieve([[3]], 5, False),
                                    coalescing.fetch(["a", "b"]), coalescing.fetch(["b", "c"]))

    r1, r2, f1, f2 = asyncio.run(main())
    assert inner.retrieve_calls == [3]
    assert [[x.id for x in hits] for hits in r1] == [["r1"], ["r2"]] and r2[0][0].id == "r3"
    assert inner.fetch_calls == [["a", "b", "c"]]  # duplicates fetched once
    assert f1 == ["memory-a", "memory-b"] and f2 == ["memory-b", "memory-c"]


def test_a_failing_part_fails_only_its_caller():
    inner = Recorder()
    coalescing = CoalescingRetrieval(inner, window_s=0.01)

    async def main():
        return await asyncio.gather(coalescing.fetch(["a"]), coalescing.fetch(["corrupt"]), return_exceptions=True)

    good, bad = asyncio.run(main())
    assert good == ["memory-a"]
    assert isinstance(bad, DataLoss)
    with pytest.raises(DataLoss):
        asyncio.run(coalescing.fetch(["corrupt"]))


class CachingRecorder(Recorder):
    def __init__(self, held) -> None:
        super().__init__()
        self.held = set(held)

    def cached(self, ids):
        return [f"memory-{i}" for i in ids] if set(ids) <= self.held else None


def test_a_fetch_of_memories_held_in_ram_skips_the_window_and_the_inner_fetch():
    inner = CachingRecorder("ab")
    coalescing = CoalescingRetrieval(inner, window_s=10.0)  # a window nobody would wait for

    async def main():
        return await asyncio.wait_for(coalescing.fetch(["b", "a", "b"]), timeout=1.0)

    assert asyncio.run(main()) == ["memory-b", "memory-a", "memory-b"]
    assert inner.fetch_calls == []


def test_a_fetch_with_one_memory_not_held_goes_through_the_inner_fetch():
    inner = CachingRecorder("a")
    coalescing = CoalescingRetrieval(inner, window_s=0.01)
    assert asyncio.run(coalescing.fetch(["a", "c"])) == ["memory-a", "memory-c"]
    assert inner.fetch_calls == [["a", "c"]]


class SlowRecorder(Recorder):
    def __init__(self, latency_s: float) -> None:
        super().__init__()
        self.latency_s = latency_s

    async def retrieve(self, queries, top_k, include_text):
        await asyncio.sleep(self.latency_s)
        return await super().retrieve(queries, top_k, include_text)


async def timed(coro):
    start = time.monotonic()
    result = await coro
    return result, time.monotonic() - start


def test_a_caller_that_needs_its_answer_later_holds_the_batch_open_for_others():
    inner = Recorder()
    coalescing = CoalescingRetrieval(inner, window_s=0.001, max_wait_s=0.3)

    async def main():
        await coalescing.retrieve([[0]], 5, False)  # the latency is known from here on
        first = asyncio.ensure_future(timed(coalescing.retrieve_by([[1]], 5, False, needed_in_s=10.0)))
        await asyncio.sleep(0.1)  # far beyond the window
        second = await coalescing.retrieve_by([[2]], 5, False, needed_in_s=10.0)
        return await first, second

    ((hits, waited), second) = asyncio.run(main())
    assert inner.retrieve_calls == [1, 2]  # the two later callers shared one call
    assert hits[0][0].id == "r1" and second[0][0].id == "r2"
    assert 0.25 < waited < 1.0  # held for max_wait_s, not for the 10 s it could have


def test_an_urgent_caller_sends_a_held_batch_at_once():
    inner = Recorder()
    coalescing = CoalescingRetrieval(inner, window_s=0.001, max_wait_s=5.0)

    async def main():
        await coalescing.retrieve([[0]], 5, False)
        patient = asyncio.ensure_future(timed(coalescing.retrieve_by([[1]], 5, False, needed_in_s=10.0)))
        await asyncio.sleep(0.02)
        urgent = await timed(coalescing.retrieve([[2]], 5, False))
        return await patient, urgent

    (_, patient_waited), (_, urgent_waited) = asyncio.run(main())
    assert inner.retrieve_calls == [1, 2]
    assert patient_waited < 0.5 and urgent_waited < 0.5


def test_a_caller_without_time_to_spare_waits_only_the_window():
    inner = SlowRecorder(latency_s=0.05)
    coalescing = CoalescingRetrieval(inner, window_s=0.001, max_wait_s=5.0)

    async def main():
        first = await timed(coalescing.retrieve_by([[0]], 5, False, needed_in_s=10.0))  # latency unknown yet
        second = await timed(coalescing.retrieve_by([[1]], 5, False, needed_in_s=0.08))  # < twice the latency
        return first, second

    (_, first_took), (_, second_took) = asyncio.run(main())
    assert first_took < 0.5 and second_took < 0.5
    assert coalescing.latency_s == pytest.approx(0.05, abs=0.04)


class DownRecorder(Recorder):
    async def fetch(self, ids):
        self.fetch_calls.append(list(ids))
        raise Unavailable("memory service: connection refused")


def test_an_outage_fails_every_caller_of_the_batch_with_one_call():
    """Asking again part by part would make each caller wait for a hung service once more."""
    inner = DownRecorder()
    coalescing = CoalescingRetrieval(inner, window_s=0.01)

    async def main():
        return await asyncio.gather(*(coalescing.fetch([name]) for name in "abcd"), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, Unavailable) for r in results)
    assert inner.fetch_calls == [["a", "b", "c", "d"]]


def test_a_batch_never_passes_max_items_and_an_overload_is_asked_once():
    """Nine callers of 30 queries became one call of 270, which the text service (256 at most)
    refused, then nine calls; an overloaded service's RESOURCE_EXHAUSTED was asked again per part."""
    inner = Recorder()
    coalescing = CoalescingRetrieval(inner, window_s=0.01, max_items=256)

    async def main():
        return await asyncio.gather(*(coalescing.retrieve([[i]] * 30, 5, False) for i in range(9)))

    results = asyncio.run(main())
    assert inner.retrieve_calls == [240, 30] and [len(r) for r in results] == [30] * 9

    class Overloaded(Recorder):
        async def retrieve(self, queries, top_k, include_text):
            self.retrieve_calls.append(len(queries))
            raise ResourceExhausted("64 requests are waiting; retry later")

    full = Overloaded()
    coalescing = CoalescingRetrieval(full, window_s=0.01)

    async def overloaded():
        return await asyncio.gather(*(coalescing.retrieve([[i]], 5, False) for i in range(16)),
                                    return_exceptions=True)

    assert all(isinstance(r, ResourceExhausted) for r in asyncio.run(overloaded()))
    assert full.retrieve_calls == [16]


class Hanging(Recorder):
    """A service that answers only when told to, and notes a call cancelled under it."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.cancelled = 0

    async def retrieve(self, queries, top_k, include_text):
        self.retrieve_calls.append(len(queries))
        try:
            await self.answer.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [[RetrievedReference(f"r{sum(q)}", 1.0)] for q in queries]


@pytest.mark.parametrize("callers_left", [2, 1])
def test_a_call_every_caller_left_is_cancelled_and_one_a_caller_still_needs_is_not(callers_left):
    """Clients that hang up (or whose deadlines pass) cancel their streams: a merged call that none of
    them needs any more went on, and the text service worked for nobody under the load it sheds."""
    inner = Hanging()
    coalescing = CoalescingRetrieval(inner, window_s=0.001)

    async def main():
        callers = [asyncio.ensure_future(coalescing.retrieve([[i]], 5, False)) for i in range(2)]
        while not inner.retrieve_calls:
            await asyncio.sleep(0.001)
        for caller in callers[:callers_left]:
            caller.cancel()
        await asyncio.sleep(0.01)
        inner.answer.set()
        done = await asyncio.gather(*callers, return_exceptions=True)
        return [r if isinstance(r, asyncio.CancelledError) else r[0][0].id for r in done]

    results = asyncio.run(main())
    assert inner.retrieve_calls == [2]
    if callers_left == 2:
        assert inner.cancelled == 1
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
    else:
        assert inner.cancelled == 0
        assert isinstance(results[0], asyncio.CancelledError) and results[1] == "r1"


def test_a_batch_every_caller_left_before_it_went_is_never_sent():
    inner = Recorder()
    coalescing = CoalescingRetrieval(inner, window_s=0.05)

    async def main():
        callers = [asyncio.ensure_future(coalescing.retrieve([[i]], 5, False)) for i in range(2)]
        await asyncio.sleep(0.005)
        for caller in callers:
            caller.cancel()
        await asyncio.sleep(0.1)  # past the window
        return await coalescing.retrieve([[7]], 5, False)  # a later caller gets a batch of its own

    assert asyncio.run(main())[0][0].id == "r7"
    assert inner.retrieve_calls == [1]


def test_a_caller_that_left_is_asked_for_by_neither_the_call_nor_its_retries():
    class Refusing(Recorder):
        async def fetch(self, ids):
            await asyncio.sleep(0.02)
            return await super().fetch(ids)

    inner = Refusing()
    coalescing = CoalescingRetrieval(inner, window_s=0.01)

    async def main():
        gone = asyncio.ensure_future(coalescing.fetch(["gone"]))
        bad = asyncio.ensure_future(coalescing.fetch(["corrupt"]))
        good = asyncio.ensure_future(coalescing.fetch(["a"]))
        await asyncio.sleep(0.002)
        gone.cancel()  # before the batch goes
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, DataLoss) and good == ["memory-a"]
    assert inner.fetch_calls == [["corrupt", "a"], ["corrupt"], ["a"]]
