"""Retrieval under faults, over real gRPC with a real release in the local S3 server: callers that
give up while the text service is busy, and the decoder's retrieval (in-process, or through the
text service) answering alike."""

import asyncio
import threading
import time

import grpc
import pytest
from test_text_service import run_with_server
from text_release import build_text_release

from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.decoder.remote import RemoteRetrieval
from memory3.services.decoder.retrieval import CoalescingRetrieval, LocalRetrieval
from memory3.services.release.reader import Release
from memory3.services.rpc.errors import Unavailable
from memory3.services.rpc.server import ServerOptions
from memory3.services.text.client import TextClient
from memory3.services.text.engine import TextEngine
from memory3.services.text.server import start_text_server
from memory3.v1 import text_service_pb2 as pb
from memory3.v1 import text_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
RELEASE = "text-faults"
QUESTION = pb.RetrieveRequest(queries=[pb.RetrievalQuery(text="Who founded the Hollin Orchestra?")])


@pytest.fixture(scope="module")
def references(store, embedder):
    return build_text_release(store, RELEASE, embedder)


class GatedEmbedder:
    """The real embedder, held while `gate` is closed: a batch that keeps the service's worker busy."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.gate = threading.Event()
        self.gate.set()

    def embed(self, texts):
        assert self.gate.wait(60), "test gate never opened"
        return self.inner.embed(texts)


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never {what}"
        await asyncio.sleep(0.01)


def test_callers_that_gave_up_do_not_make_a_busy_service_refuse_new_ones(store, references, embedder, tmp_path):
    gated = GatedEmbedder(embedder)

    async def scenario():
        engine = TextEngine.for_release(store, RELEASE, tmp_path, embedder_factory=lambda: gated, max_waiting=2)
        server = await start_text_server(engine, ServerOptions())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.TextServiceStub(channel)
                gated.gate.clear()
                running = asyncio.ensure_future(stub.Retrieve(QUESTION, timeout=60))
                await until(lambda: engine.busy, "busy")
                for _ in range(4):  # more than may wait, each giving up while the first batch runs
                    with pytest.raises(grpc.aio.AioRpcError) as gave_up:
                        await stub.Retrieve(QUESTION, timeout=0.2)
                    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, gave_up.value.details()
                    await until(lambda: all(r.result.done() for r in engine._queue), "cancelled on the server")
                waiting = asyncio.ensure_future(stub.Retrieve(QUESTION, timeout=60))
                await until(lambda: any(not r.result.done() for r in engine._queue) or waiting.done(), "queued")
                gated.gate.set()
                assert len((await waiting).results[0].references) == 5
                assert len((await running).results[0].references) == 5
        finally:
            gated.gate.set()
            await server.stop()

    asyncio.run(scenario())


def test_in_process_retrieval_answers_what_the_text_service_answers(store, references, embedder, tmp_path):
    codec = TextCodec(byte_level_tokenizer())
    local = LocalRetrieval(Release.open(store, RELEASE, tmp_path / "decoder"), embedder)
    everything = [t for r in references[:7] for t in codec.encode(r.text)]  # the filter drops these 7
    chunks = [*(codec.encode(r.text)[:64] for r in references[::2]), everything,
              codec.encode(" \n" * 32), [codec.bos_id] * 8]  # chunks of nothing to retrieve for

    async def body(client):
        want = await client.retrieve(chunks, 5, include_text=True)
        got = await local.retrieve(chunks, 5, include_text=True)
        assert [[(r.id, r.text) for r in hits] for hits in got] == [[(rid, text) for rid, _, text in hits]
                                                                    for hits in want]
        assert [len(hits) for hits in got[-3:]] == [len(references) - 7, 0, 0]

    run_with_server(store, tmp_path / "text", embedder, lambda channel, _server: body(TextClient(channel)),
                    release=RELEASE)


def test_callers_of_a_retrieval_whose_channel_closes_under_it_fail_and_never_hang(store, references, embedder,
                                                                                  tmp_path):
    codec = TextCodec(byte_level_tokenizer())
    gated = GatedEmbedder(embedder)

    async def scenario():
        engine = TextEngine.for_release(store, RELEASE, tmp_path, embedder_factory=lambda: gated)
        server = await start_text_server(engine, ServerOptions())
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            retrieval = CoalescingRetrieval(RemoteRetrieval(TextClient(channel), None, None, None))
            gated.gate.clear()
            callers = [asyncio.ensure_future(retrieval.retrieve([codec.encode(r.text)[:64]], 5, False))
                       for r in references[:3]]  # one call for the three
            await until(lambda: engine.busy, "busy")
            await channel.close()  # as a decoder closes its channels, or a connection is torn down
            outcomes = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 30)
            assert all(isinstance(outcome, Unavailable) for outcome in outcomes), outcomes
        finally:
            gated.gate.set()
            await channel.close()
            await server.stop()

    asyncio.run(scenario())
