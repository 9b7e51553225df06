"""A retrieval over index shards fails as its first failing shard fails, and stops asking the others."""

import asyncio

import pytest

from memory3.services.text.client import Answer, ShardedTextClient


class Shard:
    """A shard's client that answers, or fails, after `delay` seconds, and records a cancelled call."""

    def __init__(self, index: int, count: int, delay: float, error: Exception | None = None) -> None:
        self.index, self.count, self.delay, self.error = index, count, delay, error
        self.release, self.cancelled = None, False

    async def answer(self, queries, top_k, include_text):
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        return Answer([[(f"r{self.index}", 0.5 + self.index, "")] for _ in queries], "rel", (self.index, self.count), 5)


def test_a_failing_shard_fails_the_retrieval_at_once_and_cancels_the_others():
    failing, slow = Shard(0, 2, 0.01, RuntimeError("shard 0 is down")), Shard(1, 2, 30.0)

    async def main():
        start = asyncio.get_running_loop().time()
        with pytest.raises(RuntimeError, match="shard 0 is down"):
            await ShardedTextClient([failing, slow]).retrieve([[1, 2]])
        await asyncio.sleep(0.01)  # the cancellation is delivered
        return asyncio.get_running_loop().time() - start, slow.cancelled  # before the loop closes

    took, cancelled = asyncio.run(main())
    assert took < 5 and cancelled


def test_answers_of_every_shard_are_merged_best_first():
    async def main():
        return await ShardedTextClient([Shard(0, 2, 0.0), Shard(1, 2, 0.01)]).retrieve([[1], [2]])

    assert asyncio.run(main()) == [[("r1", 1.5, ""), ("r0", 0.5, "")]] * 2


def test_a_shard_call_cut_short_cancels_the_others_too():
    """grpc.aio ends a call whose channel closes with CancelledError, not an Exception."""
    cut, slow = Shard(0, 2, 0.01, asyncio.CancelledError()), Shard(1, 2, 30.0)

    async def main():
        with pytest.raises(asyncio.CancelledError):
            await ShardedTextClient([cut, slow]).retrieve([[1, 2]])
        await asyncio.sleep(0.01)
        return slow.cancelled

    assert asyncio.run(main())
