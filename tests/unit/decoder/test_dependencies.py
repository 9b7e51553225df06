"""The decoder's wait for its text and memory services at start: they must answer SERVING, and the text
services must answer a retrieval as the shards of the decoder's release. Fakes stand in for the services
(the point is the wait's logic; tests/integration/test_kserve.py runs it against gRPC servers)."""

import asyncio
import logging
from types import SimpleNamespace

from grpc_health.v1 import health_pb2

from memory3.services.decoder.server import BuiltEngine, wait_for_dependencies
from memory3.services.rpc.errors import Unavailable


class Serving:
    async def Check(self, request, timeout=None):  # noqa: N802 - gRPC method name
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class Shards:
    """Answers as shards that do not make one index until `fixed`."""

    def __init__(self) -> None:
        self.fixed = False
        self.asked = 0

    async def retrieve(self, queries, top_k, include_text):
        self.asked += 1
        if not self.fixed:
            raise Unavailable("text service: the 2 text services hold index shards 0/2, 0/2, where shards 0/2 to "
                              "1/2 were expected")
        return [[] for _ in queries]


def test_text_shards_that_do_not_make_one_index_keep_the_decoder_waiting(caplog):
    """It turned SERVING on the services' health alone, then failed every request with the shard mismatch."""
    shards = Shards()
    built = BuiltEngine(SimpleNamespace(retrieval=shards, codec=SimpleNamespace(bos_id=1)),
                        {"text": Serving(), "memory": Serving()}, [])

    async def main():
        waiting = asyncio.ensure_future(wait_for_dependencies(built))
        await asyncio.sleep(1.2)
        still_waiting = not waiting.done()
        shards.fixed = True
        return still_waiting, await asyncio.wait_for(waiting, 5)

    with caplog.at_level(logging.WARNING, logger="memory3.decoder"):
        still_waiting, ready = asyncio.run(main())
    assert still_waiting and ready and shards.asked >= 3
    said = [r.getMessage() for r in caplog.records if "hold index shards 0/2, 0/2" in r.getMessage()]
    assert len(said) == 1  # once, not at every retry


class Memory:
    """A memory service's stats, as `MemoryClient.stats` gives them: each call takes the next answer."""

    def __init__(self, answers) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def stats(self):
        self.asked += 1
        answer = self.answers[min(self.asked, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return SimpleNamespace(release=answer)


def test_a_memory_service_that_refuses_the_decoders_token_or_serves_another_release_keeps_it_waiting(caplog):
    """Health checks carry no token and name no release: the decoder turned SERVING, then every request
    failed with the memory service's UNAUTHENTICATED, or NOT_FOUND for the ids of its own release."""
    import grpc

    from memory3.services.rpc.errors import error_from_rpc

    refused = error_from_rpc(grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(),
                                                  grpc.aio.Metadata(), details="missing or invalid bearer token"))
    shards = Shards()
    shards.fixed = True
    memory = Memory([refused, "base", "base", "base-added"])
    built = BuiltEngine(SimpleNamespace(retrieval=shards, codec=SimpleNamespace(bos_id=1), release="base-added"),
                        {"text": Serving(), "memory": Serving()}, [], memory)

    with caplog.at_level(logging.WARNING, logger="memory3.decoder"):
        ready = asyncio.run(asyncio.wait_for(wait_for_dependencies(built), 10))
    assert ready and memory.asked == 4
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "waiting for the text and memory services: the memory service does not answer the decoder "
        "(UNAUTHENTICATED: missing or invalid bearer token)",
        "waiting for the text and memory services: the memory service serves release 'base', this decoder "
        "'base-added': point --memory-address at a memory service of 'base-added'",
    ]


def test_a_memory_reply_of_other_ids_than_asked_is_unavailable():
    """Blobs were zipped with the ids asked: one reply in another order decoded memories under the wrong ids."""
    import pytest

    from memory3.services.memory.client import MemoryClient
    from memory3.v1 import memory_service_pb2 as pb

    class Stub:
        def __init__(self, order) -> None:
            self.order = order

        async def GetMemories(self, request, timeout=None):  # noqa: N802 - gRPC method name
            return pb.GetMemoriesResponse(memories=[pb.Memory(id=request.ids[i], blob=b"x") for i in self.order])

    client = MemoryClient.__new__(MemoryClient)
    client.timeout_s, client.bank, client.max_ids = 1.0, None, 8
    client.stub = Stub([0, 1])
    assert [m.id for m in asyncio.run(client.fetch(["a", "b"]))] == ["a", "b"]
    for order in ([1, 0], [0]):
        client.stub = Stub(order)
        with pytest.raises(Unavailable, match=f"answered {len(order)} memories for 2 ids, not each in the order"):
            asyncio.run(client.fetch(["a", "b"]))


class Down:
    def __init__(self) -> None:
        self.serving = False

    async def Check(self, request, timeout=None):  # noqa: N802 - gRPC method name
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def test_under_the_continue_policy_a_decoder_starting_in_an_outage_serves_and_says_so(caplog):
    """It waited for the services under either policy: a pod started during their outage never turned
    ready, and its startup probe restarted it until they came back, while the running ones served."""
    from memory3.services.decoder.server import watch_readiness

    text = Down()
    shards = Shards()
    shards.fixed = True
    engine = SimpleNamespace(retrieval=shards, codec=SimpleNamespace(bos_id=1), draining=False, dead=lambda: None,
                             failing=lambda: None)
    built = BuiltEngine(engine, {"text": text, "memory": Serving()}, [])
    settings = SimpleNamespace(watch_interval_s=0.05, engine=SimpleNamespace(retrieval_policy="continue"))
    reports = []

    async def report(up):
        reports.append(up)

    async def main():
        started = await asyncio.wait_for(wait_for_dependencies(built, policy="continue"), 2)
        watch = asyncio.ensure_future(watch_readiness(settings, built, report))
        await asyncio.sleep(0.2)
        text.serving = True
        await asyncio.sleep(0.2)
        text.serving = False
        await asyncio.sleep(0.2)
        watch.cancel()
        return started

    with caplog.at_level(logging.WARNING, logger="memory3.decoder"):
        assert asyncio.run(main())
    assert reports == []  # ready throughout
    assert [r.getMessage() for r in caplog.records] == [
        "serving without memory until the text and memory services answer (--retrieval-policy continue): the "
        "text and memory services do not report SERVING yet",
        "the text and memory services serve this decoder: retrieval is on",
        "serving without memory (--retrieval-policy continue): the text or memory service does not answer",
    ]
    assert shards.asked == 1  # a retrieval on the way back only: each is a real one

    async def fail_policy():  # the same outage keeps a fail-fast decoder waiting
        waiting = asyncio.ensure_future(wait_for_dependencies(built, policy="fail"))
        await asyncio.sleep(0.7)
        done = waiting.done()
        waiting.cancel()
        return done

    assert not asyncio.run(fail_policy())


def test_under_the_continue_policy_services_that_refuse_the_decoder_keep_it_waiting():
    """Another release, token or shard count is a deployment's mistake, not an outage: serving without
    memory would hide it behind a log line."""
    shards = Shards()  # answer SERVING, and a retrieval with the shard mismatch
    built = BuiltEngine(SimpleNamespace(retrieval=shards, codec=SimpleNamespace(bos_id=1)),
                        {"text": Serving(), "memory": Serving()}, [])

    async def main():
        waiting = asyncio.ensure_future(wait_for_dependencies(built, policy="continue"))
        await asyncio.sleep(0.7)
        still = not waiting.done()
        shards.fixed = True
        return still, await asyncio.wait_for(waiting, 5)

    assert asyncio.run(main()) == (True, True) and built.retrieving
