"""The one place domain errors become gRPC status codes also counts every RPC's outcome."""

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY

from memory3.services.rpc.errors import NotFound, rpc_errors


class Aborted(Exception):
    pass


class FakeContext:
    """What rpc_errors uses of a grpc.aio.ServicerContext: abort raises, as the real one does."""

    def __init__(self) -> None:
        self.status: grpc.StatusCode | None = None

    async def abort(self, code, message):
        self.status = code
        raise Aborted(message)


class Servicer:
    @rpc_errors
    async def Lookup(self, request, context):  # noqa: N802
        if request == "missing":
            raise NotFound("no such thing")
        return "found"

    @rpc_errors
    async def Listing(self, request, context):  # noqa: N802
        yield 1
        if request == "broken":
            raise RuntimeError("a bug")


def handled(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("memory3_rpc_handled_total", {"method": method, "code": code}) or 0.0


def test_every_rpc_outcome_is_counted_by_method_and_code():
    """Services other than the decoder counted no failure: a storm of INTERNAL answers (a Redis
    refusing every read) showed nowhere in their metrics."""
    before = {(m, c): handled(m, c) for m, c in (("Lookup", "OK"), ("Lookup", "NOT_FOUND"),
                                                 ("Listing", "OK"), ("Listing", "INTERNAL"))}
    servicer = Servicer()

    async def calls():
        assert await servicer.Lookup("here", FakeContext()) == "found"
        with pytest.raises(Aborted, match="no such thing"):
            await servicer.Lookup("missing", FakeContext())
        assert [x async for x in servicer.Listing("fine", FakeContext())] == [1]
        with pytest.raises(Aborted, match="internal server error"):
            [x async for x in servicer.Listing("broken", FakeContext())]

    asyncio.run(calls())
    after = {key: handled(*key) - value for key, value in before.items()}
    assert after == {("Lookup", "OK"): 1, ("Lookup", "NOT_FOUND"): 1, ("Listing", "OK"): 1, ("Listing", "INTERNAL"): 1}


def test_a_call_cancelled_past_its_deadline_counts_as_deadline_exceeded():
    """gRPC cancels a handler whose client's deadline passed: it was counted nowhere, so a slow
    service's timeouts showed on no dashboard."""
    class Slow:
        @rpc_errors
        async def Wait(self, request, context):  # noqa: N802
            await asyncio.sleep(10)

    class PastDeadline(FakeContext):
        def time_remaining(self):
            return 0.0

    before = handled("Wait", "DEADLINE_EXCEEDED"), handled("Wait", "CANCELLED")

    async def call(context):
        task = asyncio.ensure_future(Slow().Wait(None, context))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(call(PastDeadline()))
    asyncio.run(call(FakeContext()))
    assert (handled("Wait", "DEADLINE_EXCEEDED") - before[0], handled("Wait", "CANCELLED") - before[1]) == (1, 1)
