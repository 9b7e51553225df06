"""The decoder's RAM tier of decoded memories, in front of the memory service, and the text service's
address (one service, or each index shard's).

The memory service is a fake here (the point is the tier's logic); the real services and stores
are exercised by tests/integration/test_generation_stack.py.
"""

import asyncio
from pathlib import Path

import pytest
import torch

from memory3.model.codecs import codec_from_name
from memory3.model.memory import ExplicitMemory
from memory3.model.memory_format import HEADER_SIZE, encode_memory
from memory3.services.decoder.remote import TIER, RemoteRetrieval, decoded_memory_cache, memory_nbytes
from memory3.services.decoder.server import DecoderSettings
from memory3.services.rpc import metrics
from memory3.services.rpc.errors import DataLoss, Unavailable
from memory3.services.storage.object_store import S3Config
from memory3.services.text.client import ShardMismatch

SHAPE = (2, 2, 4, 16)  # (memory layers, KV heads, tokens per head, head dim)
CODEC = codec_from_name("fp16")


def memory(seed: int) -> ExplicitMemory:
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(*SHAPE, generator=gen), torch.randn(*SHAPE, generator=gen)
    positions = torch.arange(SHAPE[2]).expand(SHAPE[:3]).clone()
    return ExplicitMemory(keys=keys, values=values, positions=positions)


class FakeMemoryService:
    def __init__(self, ids) -> None:
        self.blobs = {rid: encode_memory(memory(i), CODEC, ref_len=128) for i, rid in enumerate(ids)}
        self.calls: list[list[str]] = []

    async def get(self, ids):
        self.calls.append(list(ids))
        return [self.blobs[rid] for rid in ids]


def retrieval(service, cache_bytes):
    return RemoteRetrieval(None, service, CODEC, SHAPE, cache=decoded_memory_cache(cache_bytes))


def counter(name: str) -> float:
    return getattr(metrics, name).labels(tier=TIER)._value.get()


def test_hits_skip_the_memory_service_and_the_lru_is_bounded_by_bytes():
    service = FakeMemoryService("abcd")
    one = memory_nbytes(memory(0))
    remote = retrieval(service, 2 * one)  # room for two decoded memories
    hits, misses = counter("MEMORY_HITS"), counter("MEMORY_MISSES")

    async def main():
        first = await remote.fetch(["a", "b", "a"])
        second = await remote.fetch(["b", "c"])  # b is a hit; c evicts a, the least recently used
        third = await remote.fetch(["a"])
        return first, second, third

    first, second, third = asyncio.run(main())
    assert service.calls == [["a", "b"], ["c"], ["a"]]
    torch.testing.assert_close(first[0].keys, memory(0).keys.half().float())
    assert first[0] is first[2] and second[0] is first[1]  # the same decoded memory, not a copy
    torch.testing.assert_close(third[0].values, memory(0).values.half().float())
    assert (counter("MEMORY_HITS") - hits, counter("MEMORY_MISSES") - misses) == (1, 4)
    assert remote.cache.bytes == 2 * one


def test_a_corrupt_blob_is_refused_and_not_cached():
    service = FakeMemoryService("ab")
    bad = bytearray(service.blobs["b"])
    bad[HEADER_SIZE + 3] ^= 0xFF
    service.blobs["b"] = bytes(bad)
    remote = retrieval(service, 1 << 20)
    with pytest.raises(DataLoss, match="memory 'b' failed validation in the decoder"):
        asyncio.run(remote.fetch(["a", "b"]))
    assert "b" not in remote.cache
    with pytest.raises(DataLoss):
        asyncio.run(remote.fetch(["b"]))
    assert service.calls == [["a", "b"], ["b"]]


def test_without_the_tier_every_fetch_reaches_the_memory_service():
    service = FakeMemoryService("ab")
    remote = retrieval(service, 0)
    assert remote.cache is None

    async def main():
        await remote.fetch(["a", "b"])
        await remote.fetch(["a", "b"])

    asyncio.run(main())
    assert service.calls == [["a", "b"], ["a", "b"]]


def test_cached_answers_only_when_every_memory_is_held_and_counts_hits_only_then():
    service = FakeMemoryService("abc")
    remote = retrieval(service, 1 << 20)
    asyncio.run(remote.fetch(["a", "b"]))
    fetches, hits, misses = counter("MEMORY_FETCHES"), counter("MEMORY_HITS"), counter("MEMORY_MISSES")
    assert remote.cached(["a", "c"]) is None  # c was never fetched
    assert (counter("MEMORY_FETCHES"), counter("MEMORY_HITS")) == (fetches, hits)
    held = remote.cached(["b", "a", "b"])
    assert held is not None and held[0] is held[2] is remote.cache.get("b") and held[1] is remote.cache.get("a")
    assert (counter("MEMORY_FETCHES") - fetches, counter("MEMORY_HITS") - hits) == (2, 2)
    assert counter("MEMORY_MISSES") == misses and service.calls == [["a", "b"]]
    assert retrieval(service, 0).cached(["a"]) is None  # no RAM tier: nothing is ever held


class MismatchedShards:
    async def retrieve(self, queries, top_k, include_text):
        raise ShardMismatch("the 2 text services hold index shards 0/2, 0/2")


def test_text_shards_that_do_not_make_one_index_make_retrieval_unavailable():
    remote = RemoteRetrieval(MismatchedShards(), FakeMemoryService([]), CODEC, SHAPE)
    with pytest.raises(Unavailable, match="text service: the 2 text services hold index shards 0/2, 0/2"):
        asyncio.run(remote.retrieve([[1, 2, 3]], 5, False))


@pytest.mark.parametrize(("address", "shards"), [("text:50052", ["text:50052"]),
                                                 ("text-0:50052, text-1:50052", ["text-0:50052", "text-1:50052"])])
def test_the_text_address_names_the_service_or_each_index_shard(address, shards):
    settings = DecoderSettings(release="r", s3=S3Config(endpoint="s3:9000", access_key="a", secret_key="s"),
                               cache_dir=Path("/tmp"), text_address=address, memory_address="memory:50053")
    assert settings.text_addresses == shards


@pytest.mark.parametrize("address", ["text-0:50052,", "text-0:50052,text-0:50052", ","])
def test_a_text_address_list_with_a_gap_or_a_repeat_is_refused(address):
    with pytest.raises(ValueError, match="one host:port per index shard, comma-separated, each once"):
        DecoderSettings(release="r", s3=S3Config(endpoint="s3:9000", access_key="a", secret_key="s"),
                        cache_dir=Path("/tmp"), text_address=address, memory_address="memory:50053")


class FakeTextService:
    """Answers every query with one hit, as a text service of `release` does."""

    def __init__(self, release: str) -> None:
        self.release: str | None = None
        self._release = release

    async def retrieve(self, queries, top_k, include_text):
        self.release = self._release  # as TextClient records the release of the last answer
        return [[("r1", 0.9, "")] for _ in queries]


def test_a_text_service_of_another_release_is_unavailable_not_its_references():
    """A decoder of a `kb remove` release, pointed at a text service still on the parent, used the
    withdrawn reference; one on a `kb add` child failed with NOT_FOUND for its new ids."""
    mine = RemoteRetrieval(FakeTextService("base-fixed"), None, CODEC, SHAPE, release="base-fixed")
    stale = RemoteRetrieval(FakeTextService("base"), None, CODEC, SHAPE, release="base-fixed")
    assert asyncio.run(mine.retrieve([[1, 2]], 5, False))[0][0].id == "r1"
    with pytest.raises(Unavailable, match="the text service serves release 'base', this decoder 'base-fixed'"):
        asyncio.run(stale.retrieve([[1, 2]], 5, False))


class RefusingTextService:
    """A text service whose every call fails with `code` and `details`."""

    release = "r"

    def __init__(self, code, details: str) -> None:
        self.code, self.details = code, details

    async def retrieve(self, queries, top_k, include_text):
        import grpc

        raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=self.details)


def test_an_overloaded_text_service_is_an_outage_for_the_retrieval_policy():
    """RESOURCE_EXHAUSTED from the text service ended streams even under `--retrieval-policy
    continue`, and told a client of the fail policy that the decoder was at capacity."""
    import grpc

    text = RefusingTextService(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "64 retrieval requests are already waiting; retry later")
    remote = RemoteRetrieval(text, None, CODEC, SHAPE, release="r")
    with pytest.raises(Unavailable, match="text service: 64 retrieval requests are already waiting"):
        asyncio.run(remote.retrieve([[1, 2]], 5, False))


def test_a_message_over_the_channels_limit_is_no_outage():
    """gRPC answers RESOURCE_EXHAUSTED for a message over a limit too: a setting to fix, which the
    retrieval policy must not hide by generating without memory."""
    import grpc

    from memory3.services.rpc.errors import ResourceExhausted

    text = RefusingTextService(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "Received message larger than max (70000000 vs. 67108864)")
    remote = RemoteRetrieval(text, None, CODEC, SHAPE, release="r")
    with pytest.raises(ResourceExhausted, match="larger than max"):
        asyncio.run(remote.retrieve([[1, 2]], 5, False))


class RefusingMemoryService:
    """Answers every fetch with one gRPC status, as MemoryClient raises it."""

    def __init__(self, code, details: str) -> None:
        self.code, self.details = code, details

    async def get(self, ids):
        import grpc

        from memory3.services.rpc.errors import error_from_rpc

        raise error_from_rpc(grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                                  details=self.details))


@pytest.mark.parametrize(("code", "details", "outage"), [
    ("CANCELLED", "the server stopped while answering", True),  # a memory pod stopped past its grace
    ("RESOURCE_EXHAUSTED", "too busy", True),
    ("UNAVAILABLE", "connection refused", True),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", True),
    ("RESOURCE_EXHAUSTED", "Received message larger than max (70000000 vs. 67108864)", False),
    ("INVALID_ARGUMENT", "no ids", False),
    ("DATA_LOSS", "memory 'a' failed validation", False),
    # refusals of the decoder itself: a memory service of another release, another token, no memory service
    ("NOT_FOUND", "3 ids are not in release 'r'", True),
    ("UNAUTHENTICATED", "missing or invalid bearer token", True),
    ("PERMISSION_DENIED", "not allowed", True),
    ("UNIMPLEMENTED", "Method not found!", True),
])
def test_a_memory_service_outage_is_for_the_retrieval_policy_as_the_text_services_is(code, details, outage):
    """The memory path took only UNAVAILABLE and DEADLINE_EXCEEDED for an outage: a CANCELLED reached the
    client as if it had cancelled, under `--retrieval-policy continue` too. A memory service that refuses
    the decoder (a rollout half done, another token) told the client NOT_FOUND or UNAUTHENTICATED, as if
    its request or its own token were wrong."""
    import grpc

    from memory3.services.rpc.errors import ServiceError

    remote = RemoteRetrieval(None, RefusingMemoryService(getattr(grpc.StatusCode, code), details), CODEC, SHAPE,
                             cache=None)
    with pytest.raises(ServiceError) as failed:
        asyncio.run(remote.fetch(["a"]))
    assert isinstance(failed.value, Unavailable) == outage
    assert details in str(failed.value)


@pytest.mark.parametrize(("code", "refused"), [
    ("UNAUTHENTICATED", True), ("PERMISSION_DENIED", True), ("UNIMPLEMENTED", True), ("NOT_FOUND", True),
    ("INVALID_ARGUMENT", False),
])
def test_a_text_service_that_refuses_the_decoder_is_unavailable_not_the_clients_error(code, refused):
    import grpc

    from memory3.services.rpc.errors import ServiceError

    remote = RemoteRetrieval(RefusingTextService(getattr(grpc.StatusCode, code), "no"), None, CODEC, SHAPE,
                             release="r")
    with pytest.raises(ServiceError) as failed:
        asyncio.run(remote.retrieve([[1, 2]], 5, False))
    assert isinstance(failed.value, Unavailable) == refused
    assert str(failed.value) == (f"the text service refused the decoder ({code}: no)" if refused else "no")


class MisshapenTextService:
    """Answers with `results` lists of `per_query` references, whatever it was asked."""

    release = "r"

    def __init__(self, results: int, per_query: int) -> None:
        self.results, self.per_query = results, per_query

    async def retrieve(self, queries, top_k, include_text):
        return [[(f"ref{i}", 1.0, "") for i in range(self.per_query)] for _ in range(self.results)]


def test_a_text_answer_of_another_shape_is_refused_or_trimmed():
    """One result list short, or more references than asked, failed the model's step and its whole batch."""
    short = RemoteRetrieval(MisshapenTextService(1, 5), None, CODEC, SHAPE, release="r")
    with pytest.raises(Unavailable, match="answered 1 results for 2 queries"):
        asyncio.run(short.retrieve([[1, 2], [3, 4]], 5, False))
    long = RemoteRetrieval(MisshapenTextService(2, 9), None, CODEC, SHAPE, release="r")
    assert [len(found) for found in asyncio.run(long.retrieve([[1, 2], [3, 4]], 5, False))] == [5, 5]
