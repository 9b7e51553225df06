"""The closed loop's phases: measured only once the other kind of request has left, clients kept running."""

import asyncio

import pytest

from memory3.bench import closed_loop
from memory3.bench.closed_loop import ClosedLoop


@pytest.fixture(autouse=True)
def short_settle(monkeypatch):
    monkeypatch.setattr(closed_loop, "SETTLE_S", 0.01)


def test_a_phase_measures_only_its_own_kind_of_request_and_the_clients_keep_running():
    yields: list[tuple[bool, bool, bool]] = []  # (request's kind, phase's kind, window open) per response
    started: list[int] = []

    async def main():
        loop = None

        async def open_stream(k: int, memory_on: bool):
            started.append(k)
            for _ in range(10):  # 10 x 10 ms: a switch finds requests of the old kind in flight
                await asyncio.sleep(0.01)
                yields.append((memory_on, loop.memory_on, loop.window is not None))
                yield 2, 1 if memory_on else 0

        loop = ClosedLoop(open_stream, clients=3)
        await loop.start(ramp_s=0.03)
        phases = [await loop.phase(kind, 0.3) for kind in (True, False, True)]
        await loop.stop()
        return phases, loop

    (on, off, again), loop = asyncio.run(main())
    # 3 clients, each 2 tokens per 10 ms: about 600 tok/s; retrievals only with retrieval on.
    assert all(100 < tok_s < 700 for tok_s, _ in (on, off, again))
    assert on[1] > 0 and again[1] > 0 and off[1] == 0
    # Each switch found requests of the old kind still running; none was counted in a window.
    assert any(kind != phase for kind, phase, _ in yields)
    assert all(kind == phase for kind, phase, measured in yields if measured)
    assert loop.in_flight == {True: 0, False: 0}  # stop() cancelled every client and its stream
    assert len(set(started)) == len(started)  # request numbers never repeat: clients cycle the prompts


def test_a_client_that_fails_fails_the_phase():
    async def open_stream(k: int, memory_on: bool):
        await asyncio.sleep(0.01)
        raise RuntimeError("the server went away")
        yield 0, 0  # an async generator

    async def main():
        loop = ClosedLoop(open_stream, clients=2)
        await loop.start(ramp_s=0.0)
        try:
            with pytest.raises(RuntimeError, match="went away"):
                await loop.phase(True, 0.1)
        finally:
            await loop.stop()

    asyncio.run(main())
