"""The whole stack as separate processes (what `memory3 up` starts) on a real S3 server and a real
redis-server: streaming with citations, the Redis tier, Redis killed mid-stream, a corrupt blob,
grpcurl, and bad input with precise status codes.

The memory service runs without its RAM tier, and the decoder without its cache of decoded
memories, so that a repeated fetch shows in Redis.
"""

import json
import os
import re
import signal
import threading
import time

import grpc
import pytest
import redis
from grpcurl import grpcurl

from memory3.model.memory_format import HEADER_SIZE
from memory3.services.cli.main import main
from memory3.services.stack import StackOptions, start_stack, stop_processes
from memory3.services.storage.local_redis import start_local_redis
from memory3.v1 import generation_service_pb2 as pb
from memory3.v1 import generation_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
SERVICE = "memory3.v1.GenerationService"
# Long enough for two prompt chunks (64 tokens each with the byte-level tokenizer).
PROMPT = ("Tell me about the clock repairer of Pemberlyn and the lighthouse keeper of Skarn Point, "
          "and how the ferry to the Gull Islands leaves every morning.")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, random_release, local_s3):
    home = tmp_path_factory.mktemp("stack")
    options = StackOptions(home=home, release=random_release.name, s3=local_s3.config, max_batch=4,
                           extra_args={"memory": ("--ram-cache-mb", "0"), "decoder": ("--memory-cache-mb", "0")})
    state = start_stack(options, log=lambda _msg: None)
    yield state
    stop_processes(state.processes)
    # A process left running with a PID recorded without its start time (a test's restart) is
    # taken for one that reused the PID, and left alone.
    assert not [p.name for p in state.processes if p.reused()], "processes of the stack left running"


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.address("decoder")) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def metric(stack, service: str, name: str, labels: str = "") -> float:
    return stack.metric(service, name, labels)


def generate(stub, prompt=PROMPT, **params):
    request = pb.GenerateRequest(prompt=prompt, params=pb.GenerationParams(**params))
    return list(stub.Generate(request, timeout=120))


def test_generate_streams_tokens_and_per_chunk_citations(stack, stub):
    responses = generate(stub, max_tokens=80, include_reference_text=True)
    tokens = [t for r in responses for t in r.token_ids]
    text = "".join(r.text for r in responses)
    assert len(tokens) == 80 and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert len(responses) > 10  # streamed, not one message
    citations = [c for r in responses for c in r.citations]
    usage = responses[-1].usage
    prompt_chunks = -(-usage.prompt_tokens // 64)
    assert prompt_chunks >= 2
    # Every prompt chunk, then the first 64 generated tokens retrieve for the next chunk.
    assert [(c.chunk_index, c.generated) for c in citations] == \
        [(i, False) for i in range(prompt_chunks)] + [(prompt_chunks, True)]
    assert all(len(c.references) == 5 and c.references[0].text for c in citations)
    assert (usage.completion_tokens, usage.retrievals, usage.memories_read) == \
        (80, prompt_chunks + 1, 5 * (prompt_chunks + 1))
    assert text.encode("utf-8").decode("utf-8") == text
    assert responses[0].request_id and all(r.request_id == responses[0].request_id for r in responses)


def test_logprobs_and_a_logit_bias_over_grpc(stack, stub):
    """One TokenLogprob per token id, with its bytes; a bias bans the greedy token, whose logprob is
    still reported as the model's most likely: logprobs are the model's own."""
    greedy = [t for r in generate(stub, max_tokens=6) for t in r.token_ids]
    responses = generate(stub, max_tokens=6, logprobs=2, logit_bias={greedy[0]: -100.0}, frequency_penalty=0.5)
    tokens = [t for r in responses for t in r.token_ids]
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert tokens[0] != greedy[0] and [lp.token_id for lp in logprobs] == tokens
    assert logprobs[0].top[0].token_id == greedy[0]
    assert logprobs[0].top[1].logprob == logprobs[0].logprob  # the bias took the model's second choice
    assert all(len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob and lp.logprob <= lp.top[0].logprob
               for lp in logprobs)
    assert all(lp.token and lp.logprob < 0 for lp in logprobs)
    assert not any(r.logprobs for r in generate(stub, max_tokens=3))  # only when asked
    scored = generate(stub, max_tokens=0, prompt_logprobs=0)  # the prompt alone, scored
    assert not [t for r in scored for t in r.token_ids] and scored[-1].usage.completion_tokens == 0
    assert len(scored[0].prompt_logprobs) == scored[-1].usage.prompt_tokens - 1  # every prompt token after <s>
    assert all(lp.logprob < 0 and not lp.top for lp in scored[0].prompt_logprobs)


def test_stop_token_ids_and_min_tokens_over_grpc(stack, stub):
    """A stop token id ends the stream at the token, which is kept; with min_tokens past it, that token
    is not drawn there and the stream goes on."""
    greedy = generate(stub, max_tokens=8)
    tokens = [t for r in greedy for t in r.token_ids]
    k = next((i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]), None)  # its first time there
    assert k is not None, f"greedy decoding repeated one token: {tokens}"
    stopped = generate(stub, max_tokens=8, stop_token_ids=[tokens[k]])
    assert [t for r in stopped for t in r.token_ids] == tokens[: k + 1]  # the stop token's id, not its text
    assert "".join(r.text for r in stopped) == "".join(r.text for r in generate(stub, max_tokens=k))
    assert stopped[-1].finish_reason == pb.FINISH_REASON_STOP and stopped[-1].usage.completion_tokens == k + 1
    later = [t for r in generate(stub, max_tokens=8, stop_token_ids=[tokens[k]], min_tokens=k + 1) for t in r.token_ids]
    assert later[:k] == tokens[:k] and later[k] != tokens[k]


def test_identical_request_is_served_from_redis(stack, stub):
    generate(stub, prompt=PROMPT + " Once more.", max_tokens=4)
    redis_hits = metric(stack, "memory", "memory3_memory_hits_total", '{tier="redis"}')
    s3_fetches = metric(stack, "memory", "memory3_memory_fetches_total", '{tier="s3"}')
    again = generate(stub, prompt=PROMPT + " Once more.", max_tokens=4)
    fetched = {ref.id for r in again for c in r.citations for ref in c.references}  # fetched once per request
    assert len(fetched) >= 5
    assert metric(stack, "memory", "memory3_memory_hits_total", '{tier="redis"}') == redis_hits + len(fetched)
    assert metric(stack, "memory", "memory3_memory_fetches_total", '{tier="s3"}') == s3_fetches


def test_killing_redis_mid_stream_fails_no_stream(stack, stub, tmp_path):
    redis_process = stack.process("redis")
    results, errors = [], []

    def one(i):
        try:
            results.append(generate(stub, prompt=f"{PROMPT} Stream {i}.", max_tokens=200))
        except grpc.RpcError as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the streams are decoding; later chunks still need memories
    os.kill(redis_process.pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert not errors, [e.details() for e in errors]
    assert len(results) == 3
    # 200 tokens: generated chunks 1-3 each retrieve (64, 128, 192), Redis gone for the later ones.
    assert all(r[-1].usage.completion_tokens == 200 and r[-1].usage.retrievals == 3 + r[-1].usage.prompt_tokens // 64
               + (r[-1].usage.prompt_tokens % 64 > 0) for r in results)
    # Redis back on the same port: the memory service uses it again.
    restarted = start_local_redis(tmp_path, port=redis_process.port, maxmemory="256mb")
    redis_process.adopt(restarted.pid)  # so that the stack's teardown stops it
    deadline = time.monotonic() + 30
    before = metric(stack, "memory", "memory3_memory_hits_total", '{tier="redis"}')
    while time.monotonic() < deadline:
        generate(stub, prompt=PROMPT + " After the restart.", max_tokens=2)
        if metric(stack, "memory", "memory3_memory_hits_total", '{tier="redis"}') > before:
            break
        time.sleep(1.0)
    else:
        pytest.fail("the memory service did not use Redis again after it came back")


def test_corrupt_blob_in_s3_is_reported_and_never_used(stack, stub, store, random_release):
    # The first prompt chunk's best reference: corrupt it in S3 and drop it from Redis.
    first = generate(stub, max_tokens=1)[0].citations[0].references[0].id
    key = random_release.memory_key(first)
    good = store.get_bytes(key)
    bad = bytearray(good)
    bad[HEADER_SIZE + 5] ^= 0xFF  # payload byte: only the checksum can tell
    store.put_bytes(key, bytes(bad))
    redis.Redis.from_url(_redis_url(stack)).flushall()
    try:
        with pytest.raises(grpc.RpcError) as failed:
            generate(stub, max_tokens=1)
        assert failed.value.code() == grpc.StatusCode.DATA_LOSS
        assert first in failed.value.details()
        assert metric(stack, "memory", "memory3_memory_corrupt_total", '{tier="s3"}') >= 1
    finally:
        store.put_bytes(key, good)
    assert generate(stub, max_tokens=1)[-1].finish_reason


def test_grpcurl_lists_checks_health_and_generates(stack):
    port = stack.process("decoder").port
    listed = grpcurl(port, "list")
    assert listed.returncode == 0, listed.stderr
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(listed.stdout.split())
    health = grpcurl(port, "grpc.health.v1.Health/Check", data={"service": SERVICE})
    assert '"SERVING"' in health.stdout, health.stderr
    answer = grpcurl(port, f"{SERVICE}/Generate", data={"prompt": "Where is Pemberlyn?",
                                                        "params": {"maxTokens": 5}})
    assert answer.returncode == 0, answer.stderr
    messages = [json.loads(m) for m in re.split(r"\n(?=\{)", answer.stdout.strip())]
    assert messages[-1].get("finish_reason") == "FINISH_REASON_LENGTH", answer.stdout
    assert messages[-1]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(("request_", "code", "message"), [
    (pb.GenerateRequest(prompt=""), "INVALID_ARGUMENT", "empty"),
    (pb.GenerateRequest(prompt="x" * 5000), "INVALID_ARGUMENT", "shorten it"),
    (pb.GenerateRequest(prompt="hi", params=pb.GenerationParams(max_tokens=-1)), "INVALID_ARGUMENT", "max_tokens"),
    (pb.GenerateRequest(prompt="hi", params=pb.GenerationParams(max_tokens=10**6)), "INVALID_ARGUMENT",
     "does not fit"),
    (pb.GenerateRequest(prompt="hi", params=pb.GenerationParams(temperature=-0.5)), "INVALID_ARGUMENT",
     "temperature"),
    (pb.GenerateRequest(prompt="hi", params=pb.GenerationParams(logprobs=21)), "INVALID_ARGUMENT", "0..20"),
    (pb.GenerateRequest(prompt="hi", params=pb.GenerationParams(presence_penalty=3)), "INVALID_ARGUMENT",
     "presence_penalty must be in [-2.0, 2.0]"),
    (pb.GenerateRequest(prompt="hi", params=pb.GenerationParams(logit_bias={-4: 1.0})), "INVALID_ARGUMENT",
     "logit_bias: token ids are integers >= 0"),
    (pb.GenerateRequest(prompt="hi", params=pb.GenerationParams(max_tokens=3, min_tokens=4)), "INVALID_ARGUMENT",
     "min_tokens must be in 0..max_tokens (3), got 4: raise max_tokens too"),
    (pb.GenerateRequest(prompt="hi", params=pb.GenerationParams(stop_token_ids=[-1])), "INVALID_ARGUMENT",
     "stop_token_ids: token id -1 is outside"),
    (pb.GenerateRequest(prompt="hi", release="no-such-release"), "NOT_FOUND", "not served here"),
    (pb.GenerateRequest(prompt_token_ids=[1, 99999]), "INVALID_ARGUMENT", "vocabulary"),
    (pb.GenerateRequest(prompt="hi", prompt_token_ids=[5]), "INVALID_ARGUMENT", "not both"),
    (pb.GenerateRequest(prompt="hi", params=pb.GenerationParams(retrieval=99)), "INVALID_ARGUMENT",
     "99 is not a RetrievalMode"),
    (pb.GenerateRequest(prompt="hi", release="r" * 20_000), "NOT_FOUND", "(20000 characters) is not served here"),
])
def test_bad_requests_get_precise_status_codes(stack, stub, request_, code, message):
    with pytest.raises(grpc.RpcError) as failed:
        list(stub.Generate(request_, timeout=30))
    assert failed.value.code().name == code
    assert message in failed.value.details()


def test_undecodable_and_oversized_requests(stack):
    with grpc.insecure_channel(stack.address("decoder")) as channel:
        raw = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=lambda b: b,
                                   response_deserializer=pb.GenerateResponse.FromString)
        # Field 1 (prompt, a string) holding bytes that are not UTF-8.
        refused = '{code="INVALID_ARGUMENT",method="Generate"}'
        before = metric(stack, "decoder", "memory3_rpc_handled_total", refused)
        with pytest.raises(grpc.RpcError) as failed:
            list(raw(b"\x0a\x02\xff\xfe", timeout=30))
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in failed.value.details()
        assert metric(stack, "decoder", "memory3_rpc_handled_total", refused) == before + 1  # counted, as all answers
        with pytest.raises(grpc.RpcError) as failed:
            list(raw(pb.GenerateRequest(prompt="x" * (65 << 20)).SerializeToString(), timeout=30))
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_gauges_return_to_zero(stack, stub):
    # Cancel a stream mid-way, as a client that goes away does.
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPT, params=pb.GenerationParams(max_tokens=300)), timeout=60)
    next(call)
    call.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = metric(stack, "decoder", "memory3_num_requests_running")
        waiting = metric(stack, "decoder", "memory3_num_requests_waiting")
        if running == 0 and waiting == 0:
            break
        time.sleep(0.2)
    assert (running, waiting) == (0, 0)
    assert metric(stack, "decoder", "memory3_generation_tokens_total") > 0


def _redis_url(stack) -> str:
    return stack.redis_url


def test_deadline_is_honoured_and_frees_the_slot(stack, stub):
    with pytest.raises(grpc.RpcError) as expired:
        list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, params=pb.GenerationParams(max_tokens=300,
                                                                                         ignore_eos=True)),
                           timeout=0.5))
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while metric(stack, "decoder", "memory3_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(stack, "decoder", "memory3_num_requests_running") == 0


def test_sigterm_drains_in_flight_streams_and_refuses_new_ones(stack, stub):
    """Last in this module: it stops the decoder."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    decoder = stack.process("decoder")
    # Long enough to be running still when the new request comes (a fixed pause let a shorter one finish
    # first on a fast machine: the drain was over, and the server's own stop cancelled the new request).
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPT, params=pb.GenerationParams(max_tokens=600,
                                                                                       ignore_eos=True)),
                         timeout=120)
    first = next(call)
    os.kill(decoder.pid, signal.SIGTERM)
    with grpc.insecure_channel(stack.address("decoder")) as channel:  # draining once it says NOT_SERVING
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, max_tokens=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(call)
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 600
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(decoder.pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{decoder.pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                break
        time.sleep(0.2)
    else:
        pytest.fail("the decoder did not exit after draining")


def test_a_stack_with_its_index_in_shards_retrieves_from_every_shard(tmp_path, random_release, local_s3, capsys):
    options = StackOptions(home=tmp_path, release=random_release.name, s3=local_s3.config, redis=False,
                           max_batch=2, text_shards=2)
    state = start_stack(options, log=lambda _msg: None)
    try:
        assert [p.name for p in state.processes] == ["text-0", "text-1", "memory", "decoder"]
        with grpc.insecure_channel(state.address("decoder")) as channel:
            responses = generate(pb_grpc.GenerationServiceStub(channel), max_tokens=8)
        assert main(["status", "--home", str(tmp_path)]) == 0
        shown = capsys.readouterr().out
        assert all(re.search(rf"^{name} +{p.pid} +127\.0\.0\.1:{p.port} +SERVING ", shown, re.M)
                   for name, p in ((p.name, p) for p in state.processes)), shown
    finally:
        stop_processes(state.processes)
    assert main(["status", "--home", str(tmp_path)]) == 1  # the state is left: each process exited
    assert "text-0" in (shown := capsys.readouterr().out) and "exited" in shown and "not every process is up" in shown
    assert main(["status", "--home", str(tmp_path / "none")]) == 1
    assert "no stack is running" in capsys.readouterr().out
    # Shard i holds the references of rows i, i + 2, …: the decoder merged what both found.
    row = {r.id: i for i, r in enumerate(random_release.references)}
    cited = {ref.id for r in responses for c in r.citations for ref in c.references}
    assert responses[-1].usage.retrievals >= 1 and {row[rid] % 2 for rid in cited} == {0, 1}
    with pytest.raises(ValueError, match="--text-shards must be between 1 and 64, got 0"):
        StackOptions(home=tmp_path, release=random_release.name, text_shards=0)
