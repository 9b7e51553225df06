"""A closed loop of clients switched between two kinds of request (retrieval on / off) in phases.

Used by the serving benchmark both through the services (gRPC) and on the engine alone (in
process): the same protocol on both, so that their ratios compare.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable

SETTLE_S = 1.0

# (request number, retrieval on) -> the stream's responses as (tokens, chunks retrieved for)
OpenStream = Callable[[int, bool], AsyncIterator[tuple[int, int]]]


class ClosedLoop:
    """Clients that each send requests back to back, through the whole on / off comparison.

    Clients that all start at once stay in step: their streams are prefilled together, finish
    together, and the next ones arrive together (and, with retrieval on, are all retrieved for at
    once), a cohort every request's length, which steady traffic does not have. So the clients
    start once, one by one over a ramp, and keep running; a phase only changes the kind of request
    each client sends next. Each client finishes the request it has, so the switch stays staggered,
    and the phase is measured from the moment no request of the other kind is left in flight.
    Phases are short and adjacent: a shared machine's speed drifts within a minute by a tenth or
    more, and the closer the paired phases, the less of that drift their ratio carries.
    """

    def __init__(self, open_stream: OpenStream, clients: int) -> None:
        self.open_stream, self.clients = open_stream, clients
        self.memory_on = True
        self.in_flight = {True: 0, False: 0}  # requests sent and not finished, by kind
        self.window: list[int] | None = None  # [tokens, citations] received while a phase is measured
        self._tasks: list[asyncio.Task] = []

    async def start(self, ramp_s: float) -> None:
        self._tasks = [asyncio.ensure_future(self._client(i, ramp_s)) for i in range(self.clients)]
        await asyncio.sleep(ramp_s)

    async def _client(self, i: int, ramp_s: float) -> None:
        await asyncio.sleep(ramp_s * i / self.clients)
        k = i
        while True:
            memory_on = self.memory_on
            self.in_flight[memory_on] += 1
            try:
                async for tokens, citations in self.open_stream(k, memory_on):
                    if self.window is not None:
                        self.window[0] += tokens
                        self.window[1] += citations
            finally:
                self.in_flight[memory_on] -= 1
            k += self.clients

    async def phase(self, memory_on: bool, seconds: float, *, side_load=None, counters=None,
                    served: list[int] | None = None) -> tuple[float, float]:
        """Switch the clients to one kind of request, then measure `seconds` of it.

        Returns (tokens/s, retrievals/s) received; with `served` (the list `side_load` appends to),
        the second figure is the side load's chunks done per measured second instead. `side_load`,
        a coroutine, runs from the switch to the end of the phase; `counters`, when given (its
        `start()` and `stop(elapsed)`), records what the server did over the measured interval."""
        self.memory_on = memory_on
        side = asyncio.ensure_future(side_load) if side_load is not None else None
        try:
            await asyncio.sleep(SETTLE_S)  # a side load reaches its rate, the batch turns over
            while self.in_flight[not memory_on]:
                self._raise_failures()
                await asyncio.sleep(0.05)
            done_before = len(served) if served is not None else 0
            self.window = [0, 0]
            if counters is not None:
                counters.start()
            start = time.perf_counter()
            await asyncio.sleep(seconds)
            elapsed = time.perf_counter() - start
            (tokens, citations), self.window = self.window, None
            if counters is not None:
                counters.stop(elapsed)
            if served is not None:
                citations = len(served) - done_before
        finally:
            if side is not None:
                side.cancel()
                await asyncio.gather(side, return_exceptions=True)
        self._raise_failures()
        return tokens / elapsed, citations / elapsed

    def _raise_failures(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()

    async def stop(self) -> None:
        """Cancel every client and its stream; the server frees their slots within SETTLE_S."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(SETTLE_S)


def median_interval(xs: list[float], level: float = 0.9, resamples: int = 2000, seed: int = 0) -> list[float]:
    """A percentile-bootstrap interval of the median of `xs`: how far the run's noise leaves it uncertain."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    low = int((1 - level) / 2 * resamples)
    return [round(medians[low], 4), round(medians[resamples - 1 - low], 4)]
