"""TextService over real gRPC, with a real release in the local S3 server and the real embedder."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpcurl import grpcurl
from text_release import build_text_release

from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.retrieval.embedder import Embedder
from memory3.services.rpc.server import ServerOptions
from memory3.services.text.client import TextClient
from memory3.services.text.engine import MAX_QUERIES, TextEngine
from memory3.services.text.server import start_text_server
from memory3.v1 import text_service_pb2 as pb
from memory3.v1 import text_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
RELEASE = "text-svc"
SERVICE = "memory3.v1.TextService"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def references(store, embedder):
    return build_text_release(store, RELEASE, embedder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_with_server(store, cache_dir, embedder, body, release=RELEASE):
    """Start a TextService of `release` in-process, run `body(channel, server)`, stop it."""
    async def scenario():
        engine = TextEngine.for_release(store, release, cache_dir, embedder_factory=lambda: embedder)
        server = await start_text_server(engine, ServerOptions())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await body(channel, server)
        finally:
            await server.stop()
    asyncio.run(scenario())


def test_health_is_serving_only_once_the_release_is_loaded(store, references, embedder, tmp_path):
    gate = threading.Event()
    port = free_port()

    def slow_embedder():
        assert gate.wait(60), "test gate never opened"
        return embedder

    async def scenario():
        engine = TextEngine.for_release(store, RELEASE, tmp_path, embedder_factory=slow_embedder)
        starting = asyncio.create_task(start_text_server(engine, ServerOptions(port=port)))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            for _ in range(100):
                try:
                    status = await health.Check(request, timeout=1)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as early:
                await TextClient(channel).tokenize("too early")
            assert early.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in early.value.details()
            gate.set()
            server = await starting
            try:
                assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
                overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert overall.status == health_pb2.HealthCheckResponse.SERVING
            finally:
                await server.stop()

    asyncio.run(scenario())


def test_retrieval_finds_partial_references_and_drops_verbatim_ones(store, references, embedder, tmp_path):
    codec = TextCodec(byte_level_tokenizer())
    pump = next(r for r in references if r.text.startswith("Veltrix"))
    oboist = next(r for r in references if r.text.startswith("Its principal oboist"))
    partial = "Veltrix Industries makes the Quarn-7 water pump"

    async def body(channel, server):
        client = TextClient(channel)
        by_text = await client.retrieve_texts([partial, pump.text], top_k=3, include_text=True)
        assert client.release == RELEASE
        assert by_text[0][0][0] == pump.id and by_text[0][0][2] == pump.text
        assert by_text[0][0][1] > by_text[0][1][1]  # best first, cosine scores
        assert pump.id not in [rid for rid, _, _ in by_text[1]]  # verbatim: overlap 1 > 2/3, dropped
        assert len(by_text[1]) == 3  # and the next best took its place

        chunk = codec.encode("principal oboist Tamsin Reel of the orchestra")
        by_ids = await client.retrieve([chunk, codec.encode(partial)], top_k=0)
        assert [len(hits) for hits in by_ids] == [5, 5]  # 0: the release's memories per chunk
        assert by_ids[0][0][0] == oboist.id and by_ids[1][0][0] == pump.id
        assert all(text == "" for hits in by_ids for _, _, text in hits)

        ids = await client.tokenize("copper bridges", add_bos=True)
        assert ids[0] == codec.bos_id and ids[1:] == codec.encode("copper bridges")
        assert await client.detokenize(ids) == "copper bridges"

    run_with_server(store, tmp_path, embedder, body)


@pytest.mark.parametrize(("request_", "message"), [
    (pb.RetrieveRequest(), "queries is empty"),
    (pb.RetrieveRequest(queries=[pb.RetrievalQuery(text="a")] * (MAX_QUERIES + 1)), "at most 256"),
    (pb.RetrieveRequest(queries=[pb.RetrievalQuery(text="a", token_ids=[70])]), "sets both of text and token_ids"),
    (pb.RetrieveRequest(queries=[pb.RetrievalQuery(text="a"), pb.RetrievalQuery()]),
     r"queries[1] sets neither of text and token_ids"),
    (pb.RetrieveRequest(queries=[pb.RetrievalQuery(text=" \n")]), "queries[0].text is empty"),
    (pb.RetrieveRequest(queries=[pb.RetrievalQuery(text="a")], top_k=-1), "top_k is -1; use 1..64"),
    (pb.RetrieveRequest(queries=[pb.RetrievalQuery(text="a")], top_k=65), "top_k is 65"),
    (pb.RetrieveRequest(queries=[pb.RetrievalQuery(token_ids=[70, 5000])]),
     "queries[0].token_ids[1] = 5000 is not a token id of release 'text-svc'"),
    (pb.RetrieveRequest(queries=[pb.RetrievalQuery(token_ids=[-3])]), "token_ids[0] = -3"),
    (pb.RetrieveRequest(queries=[pb.RetrievalQuery(text="x" * (64 * 1024 + 1))]), "at most 65536 bytes"),
    (pb.TokenizeRequest(text="x" * (64 * 1024 + 1)), "text is 65537 bytes"),
    (pb.DetokenizeRequest(token_ids=[70, 1 << 20]), "token_ids[1] = 1048576 is not a token id"),
])
def test_bad_input_is_invalid_argument_saying_what_to_fix(store, references, embedder, tmp_path, request_, message):
    async def body(channel, server):
        stub = pb_grpc.TextServiceStub(channel)
        call = {pb.RetrieveRequest: stub.Retrieve, pb.TokenizeRequest: stub.Tokenize,
                pb.DetokenizeRequest: stub.Detokenize}[type(request_)]
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await call(request_)
        assert bad.value.code() == INVALID, bad.value.details()
        assert message in bad.value.details()

    run_with_server(store, tmp_path, embedder, body)


def test_memory3_serve_text_answers_grpcurl(local_s3, references, tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": local_s3.config.access_key,
           "MEMORY3_S3_SECRET_KEY": local_s3.config.secret_key}
    env.pop("MEMORY3_AUTH_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "memory3.services.cli.main", "serve", "text", "--release", RELEASE,
         "--port", str(port), "--metrics-port", str(metrics_port), "--cache-dir", str(tmp_path),
         "--s3-endpoint", local_s3.config.endpoint, "--s3-bucket", local_s3.config.bucket],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            health = grpcurl(port, "grpc.health.v1.Health/Check", data={"service": SERVICE})
            if '"SERVING"' in health.stdout:
                break
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"not SERVING in time: {health.stdout} {health.stderr}"
            time.sleep(0.5)

        listed = grpcurl(port, "list")
        assert listed.returncode == 0, listed.stderr
        assert {SERVICE, "grpc.health.v1.Health"} <= set(listed.stdout.split())
        described = grpcurl(port, "describe", SERVICE)
        assert "rpc Retrieve ( .memory3.v1.RetrieveRequest )" in described.stdout, described.stderr

        pump = next(r for r in references if r.text.startswith("Veltrix"))
        answer = grpcurl(port, f"{SERVICE}/Retrieve", data={
            "queries": [{"text": "who makes the Quarn-7 water pump"}], "topK": 2, "includeText": True})
        assert answer.returncode == 0, answer.stderr
        result = json.loads(answer.stdout)
        assert result["release"] == RELEASE
        assert result["results"][0]["references"][0]["id"] == pump.id
        assert result["results"][0]["references"][0]["text"] == pump.text

        bad = grpcurl(port, f"{SERVICE}/Retrieve", data={"queries": [], "topK": 2})
        assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "queries is empty" in bad.stderr

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        line = next(m for m in metrics.splitlines() if m.startswith("memory3_retrieval_queries_total"))
        assert float(line.split()[-1]) >= 1
        assert "memory3_retrieval_latency_seconds_count" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read()


def test_bf16_query_embeddings_rank_like_the_float32_index(embedder, references, tmp_path):
    bf16 = Embedder(dtype="bfloat16")
    texts = [r.text for r in references]
    queries = ["Who makes the Quarn-7 pump?", "Where does the glassblower Orvath Kellen work?",
               "Which orchestra plays baroque music in a grain hall?", "How heavy is a sack of rye flour?",
               "Since when has the lighthouse of Corvinne guided boats?"]
    index = embedder.embed(texts)  # (R, dim), as the trainer builds it
    exact, fast = embedder.embed(queries), bf16.embed(queries)
    assert fast.dtype == exact.dtype and ((exact * fast).sum(1) > 0.9999).all()
    assert (exact != fast).any()  # computed in bf16 indeed, not in float32
    assert ((exact @ index.T).argmax(1) == (fast @ index.T).argmax(1)).all()
    with pytest.raises(ValueError, match="embedder dtype must be one of"):
        Embedder(dtype="float16")


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from memory3.services.retrieval.embedder import native_bf16

    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("flags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert native_bf16(with_bf16) and not native_bf16(without) and not native_bf16(tmp_path / "missing")


def test_a_text_embeds_the_same_in_any_batch(embedder, references):
    """Batches are formed by length and padded to their longest; padding must not leak into a vector."""
    texts = [r.text for r in references] + ["pump", "", "Who makes the Quarn-7 pump? " * 20]
    together = embedder.embed(texts)  # (N, dim)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    assert together.shape == (len(texts), embedder.dim)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, embedder.dim)
