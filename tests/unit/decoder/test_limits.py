"""Per-client stream limits, request rules that keep bad numbers out of the scheduler, and a
retrieval bug that fails its own stream instead of leaving it paused forever."""

import asyncio
import math
from types import SimpleNamespace

import grpc
import pytest

from memory3.services.decoder import validation
from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationRequest
from memory3.services.decoder.retrieval import RetrievedReference
from memory3.services.rpc.errors import InvalidInput, NotFound, ResourceExhausted, ServiceError, status_for


def build_request(engine, **fields):
    return asyncio.run(validation.build_request(engine, **fields))


def body(text_codec, n=20):
    return [text_codec.bos_id, *range(3, 3 + n)]


def test_streams_per_client_are_limited(tiny_model, text_codec):
    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=4, max_streams_per_client=2))
        await engine.start()
        try:
            def request(client, n=400):
                return GenerationRequest(body(text_codec), n, use_memory=False, client_id=client)

            a1, a2 = engine.generate(request("a")), engine.generate(request("a"))
            await a1.__anext__()
            await a2.__anext__()
            with pytest.raises(ResourceExhausted, match="'a' already has 2 streams open"):
                await engine.generate(request("a", 2)).__anext__()
            async for _ in engine.generate(request("b", 2)):  # another client is served
                pass
            async for _ in engine.generate(request("", 2)):  # no client id: not counted
                pass
            await a1.aclose()
            async for _ in engine.generate(request("a", 2)):  # a slot of its own again
                pass
            await a2.aclose()
            assert engine.per_client == {} and engine.accepted == 0
        finally:
            await engine.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_negative_limit_is_refused():
    with pytest.raises(ValueError, match="max_streams_per_client"):
        EngineConfig(max_streams_per_client=-1)


@pytest.fixture
def fake_engine(text_codec):
    return SimpleNamespace(release="r", codec=text_codec, config=EngineConfig(), room=lambda body, use_memory: 10_000)


@pytest.mark.parametrize(("fields", "message"), [
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"top_p": math.nan}, "top_p must be in"),
    ({"request_id": "x" * 129}, "request_id"),
    ({"request_id": "line\nbreak"}, "request_id"),
    ({"seed": 2**63}, "seed must be a 64-bit signed integer"),
    ({"seed": -(2**63) - 1}, "seed must be a 64-bit signed integer"),
])
def test_numbers_the_sampler_cannot_use_are_refused(fake_engine, fields, message):
    with pytest.raises(InvalidInput, match=message):
        build_request(fake_engine, prompt="hello", **fields)


@pytest.mark.parametrize("fields", [{"prompt": "hi \ud800 there"}, {"prompt": "hello", "stop": ("\udfff",)}])
def test_text_that_is_not_unicode_is_refused(fake_engine, fields):
    """JSON may spell a lone surrogate (\\ud800), which the tokenizer refuses with a TypeError: a 500."""
    where = "prompt" if fields["prompt"] != "hello" else "stop"
    with pytest.raises(InvalidInput, match=f"{where}: not valid Unicode \\(a lone surrogate at character "):
        build_request(fake_engine, **fields)


def test_seeds_at_the_ends_of_int64_are_taken(fake_engine):
    for seed in (2**63 - 1, -(2**63)):
        assert build_request(fake_engine, prompt="hello", seed=seed).sampling.seed == seed


def test_a_release_name_of_any_size_is_quoted_short(fake_engine):
    with pytest.raises(NotFound) as refused:
        build_request(fake_engine, prompt="hello", release="x" * 20_000)
    assert len(str(refused.value)) < 400 and "20000 characters" in str(refused.value)


def test_the_default_max_tokens_fits_what_the_prompt_leaves(tiny_model, text_codec):
    """A long prompt sent with max_tokens 0 gets the room left, not a refusal of a number the
    client never sent; a number the client did send is still judged."""
    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(default_max_tokens=128))
    room = 5
    ids = [3 + i % 200 for i in range(engine.max_seq_len - room - 1)]  # no retrieval: no reference prefix
    request = build_request(engine, prompt_token_ids=ids)
    assert request.max_tokens == room
    engine.validate(request)
    assert build_request(engine, prompt_token_ids=ids[:10]).max_tokens == 128
    with pytest.raises(InvalidInput, match=f"max_tokens=6 does not fit.*room for {room} new tokens"):
        engine.validate(build_request(engine, prompt_token_ids=ids, max_tokens=room + 1))


def test_status_messages_are_cut_to_fit_a_header():
    code, message = status_for(NotFound("x" * 50_000))
    assert code == grpc.StatusCode.NOT_FOUND
    assert len(message) < 2100 and message.endswith("(50000 characters in all)")


def test_underflowing_temperature_is_greedy(fake_engine):
    # logits / 1e-45 overflow to inf and the sampler's softmax to NaN: such a request once failed the whole batch
    assert build_request(fake_engine, prompt="hello", temperature=1e-45).sampling.temperature == 0.0
    assert build_request(fake_engine, prompt="hello", temperature=0.7).sampling.temperature == pytest.approx(0.7)


class BrokenOnGeneratedChunks:
    """Answers the prompt's retrieval, then fails with a bug (not a ServiceError) mid-generation."""

    def __init__(self, memory) -> None:
        self.memory, self.calls = memory, 0

    async def retrieve(self, queries, top_k, include_text):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("a bug in retrieval")
        return [[RetrievedReference("m", 1.0)] for _ in queries]

    async def fetch(self, ids):
        return [self.memory for _ in ids]


def test_a_retrieval_bug_fails_its_stream_instead_of_hanging(tiny_model, text_codec, prefix):
    import torch

    from memory3.model.encoder import encode_references

    with torch.inference_mode():
        [memory] = encode_references(tiny_model, [list(range(3, 3 + tiny_model.config.ref_len))], prefix)

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, BrokenOnGeneratedChunks(memory),
                                  EngineConfig(max_batch=2))
        await engine.start()
        try:
            with pytest.raises(ServiceError, match="internal error while retrieving"):
                async for _ in engine.generate(GenerationRequest(body(text_codec), 100, ignore_eos=True)):
                    pass  # 64 generated tokens in, the stream needs memories for its next chunk
            assert engine.accepted == 0 and engine.scheduler.running() == 0
        finally:
            await engine.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_long_prompt_is_tokenized_without_stalling_the_event_loop(fake_engine):
    """Tokenizing ran on the event loop that streams every request's tokens: a prompt of 64 Ki emoji
    (about 262 K byte-level tokens) held the other streams for a fifth of a second. It runs in a worker
    thread, without the GIL; and the request's arrival is taken before, so time to first token counts it."""
    import time

    prompt = "\U0001f600" * fake_engine.config.max_prompt_chars
    start = time.perf_counter()
    fake_engine.codec.body(prompt)
    alone = time.perf_counter() - start

    async def main():
        gaps = []

        async def tick():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.01)
        before = time.monotonic()
        request = await validation.build_request(fake_engine, prompt=prompt)
        await asyncio.sleep(0.01)  # the ticker sees a stall once it runs again
        ticker.cancel()
        return max(gaps), before, request

    longest, before, request = asyncio.run(main())
    assert longest < alone / 2, (longest, alone)
    assert len(request.prompt_ids) == 4 * len(prompt) + 1
    assert before <= request.arrival <= time.monotonic()


def test_prompts_are_tokenized_apart_from_the_threads_that_decode_memories(fake_engine):
    """Tokenizing shared the default executor with memory decoding: a burst of long prompts held up the
    memories streams were waiting for, and busy decoding held up every new prompt."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    async def main():
        loop = asyncio.get_running_loop()
        gate = threading.Event()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        busy = loop.run_in_executor(None, gate.wait, 10)  # the default executor's only thread, decoding
        try:
            return await asyncio.wait_for(validation.build_request(fake_engine, prompt="hello"), 5)
        finally:
            gate.set()
            await busy

    assert len(asyncio.run(main()).prompt_ids) == 6


def test_kserve_v2_parameters_too_large_for_a_float_are_refused_and_penalties_read():
    from memory3.services.decoder.kserve_model import _parameters

    with pytest.raises(InvalidInput, match="parameter 'temperature' must be a finite number, got '1000"):
        _parameters({"temperature": 10**400})  # a JSON integer has no bound
    with pytest.raises(InvalidInput, match="parameter 'top_p' must be a finite number, got 'nan'"):
        _parameters({"top_p": "nan"})
    for odd in ("1_000", "٣", "0x10", ""):  # float() takes the first two
        with pytest.raises(InvalidInput, match="parameter 'temperature' must be a finite number"):
            _parameters({"temperature": odd})
    assert _parameters({"presence_penalty": "0.5", "frequency_penalty": 1, "top_p": " .5e0 ", "min_tokens": 2}) == {
        "presence_penalty": 0.5, "frequency_penalty": 1.0, "top_p": 0.5, "min_tokens": 2}
