"""`memory3 serve kserve` as a process over a real release in a real local S3 server, in-process retrieval:
a v2 gRPC client (tritonclient, in its own process: it and kserve both register the `inference` proto
package), v2 REST, the OpenAI-style route with and without SSE streaming, and bad input. With remote
retrieval, readiness and SIGTERM against text and memory services that are down or come and go.
"""

import http.client
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from release_fixtures import RANDOM_RELEASE

from memory3.services.cli.main import main
from memory3.services.storage.local_s3 import free_port
from memory3.v1 import memory_service_pb2 as memory_pb
from memory3.v1 import memory_service_pb2_grpc as memory_pb_grpc
from memory3.v1 import text_service_pb2 as text_pb
from memory3.v1 import text_service_pb2_grpc as text_pb_grpc

pytestmark = pytest.mark.integration
MODEL = "memory3"
PROMPT = "Who repairs clocks in the river town of Pemberlyn, and how many bridges does it have?"


class KServeProcess:
    def __init__(self, process: subprocess.Popen, http_port: int, grpc_port: int, log) -> None:
        self.process, self.http_port, self.grpc_port, self.log = process, http_port, grpc_port, log

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def post(self, path: str, body, timeout: float = 120.0, headers: dict | None = None) -> tuple[int, dict, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.status, dict(reply.headers), json.loads(reply.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as reply:
                return reply.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0  # not listening yet

    def ready(self) -> bool:
        return self.status(f"/v2/models/{MODEL}/ready") == 200

    def readiness(self) -> tuple[int, int]:
        """The server's and the model's readiness, as a probe sees them."""
        return self.status("/v2/health/ready"), self.status(f"/v2/models/{MODEL}/ready")

    def wait_for(self, condition, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"memory3 serve kserve exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"memory3 serve kserve: not {what} within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def send_unread(self, path: str, body: dict, headers: dict | None = None) -> http.client.HTTPConnection:
        """A request sent and its reply left unread: closing the connection is the client hanging up."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        return connection

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def start_kserve(home, release, local_s3, *extra: str) -> KServeProcess:
    http_port, grpc_port = free_port(), free_port()
    s3 = local_s3.config
    env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": s3.access_key, "MEMORY3_S3_SECRET_KEY": s3.secret_key}
    env.pop("MEMORY3_AUTH_TOKEN", None)
    env.pop("MEMORY3_DEPENDENCY_TOKEN", None)
    log = home / "kserve.log"
    args = ["serve", "kserve", "--release", release.name, "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--s3-endpoint", s3.endpoint, "--s3-bucket", s3.bucket,
            "--cache-dir", str(home / "releases"), "--max-batch", "2", "--default-max-tokens", "8", "--grace", "5",
            *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "memory3.services.cli.main", *args], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return KServeProcess(process, http_port, grpc_port, log)


def exits_on_sigterm(server: KServeProcess, within: float = 30.0) -> None:
    server.process.terminate()  # by PID; the server drains and exits by itself
    try:
        code = server.process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"memory3 serve kserve still ran {within:g} s after SIGTERM:\n{server.log_tail()}")
    assert code == 0, f"memory3 serve kserve exited with {code} after SIGTERM:\n{server.log_tail()}"


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory, random_release, local_s3):
    server = start_kserve(tmp_path_factory.mktemp("kserve"), random_release, local_s3, "--chat-template", "qa")
    try:
        server.wait_for(server.ready, "ready")
        yield server
        exits_on_sigterm(server)
    finally:
        server.stop()


class NothingFound(text_pb_grpc.TextServiceServicer):
    """A text service of the release's one index shard that finds nothing: what the decoder asks at start."""

    def Retrieve(self, request, context):  # noqa: N802 - gRPC method name
        return text_pb.RetrieveResponse(results=[text_pb.RetrievalResult() for _ in request.queries],
                                        release=RANDOM_RELEASE, shard_index=0, shard_count=1, top_k=1)


class StatsOnly(memory_pb_grpc.MemoryServiceServicer):
    """A memory service of the release that answers its stats: what the decoder asks at start."""

    def GetStats(self, request, context):  # noqa: N802 - gRPC method name
        return memory_pb.GetStatsResponse(release=RANDOM_RELEASE)


class Dependency:
    """A gRPC health service in place of the text or the memory service (the text one answers a retrieval
    with nothing, the memory one its stats): KServe readiness asks only them."""

    def __init__(self) -> None:
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        text_pb_grpc.add_TextServiceServicer_to_server(NothingFound(), self.server)
        memory_pb_grpc.add_MemoryServiceServicer_to_server(StatsOnly(), self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.serving(False)
        self.server.start()

    def serving(self, up: bool) -> None:
        status = health_pb2.HealthCheckResponse
        self.health.set("", status.SERVING if up else status.NOT_SERVING)


@pytest.fixture
def dependencies():
    text, memory = Dependency(), Dependency()
    yield text, memory
    for dependency in (text, memory):
        dependency.server.stop(grace=None)


def metric(server, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_for_metric(server, name: str, value: float, what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while metric(server, name) != value:
        assert time.monotonic() < deadline, f"{what}: {name} is {metric(server, name)}, not {value}"
        time.sleep(0.05)


def v2_request(prompt: str = PROMPT, **parameters) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
            "parameters": parameters}


def completion(server, **fields) -> dict:
    status, _, body = server.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, **fields})
    assert status == 200, body
    return body


V2_GRPC_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(sys.argv[1])
    ready = client.is_server_ready() and client.is_model_ready(sys.argv[2])
    prompt = triton.InferInput("text", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([sys.argv[3].encode()], dtype=object))
    reply = client.infer(sys.argv[2], [prompt], parameters={"max_tokens": 12, "temperature": "0"},
                         outputs=[triton.InferRequestedOutput("text"), triton.InferRequestedOutput("citations")])
    result = {"ready": ready, "text": reply.as_numpy("text")[0].decode(),
              "citations": json.loads(reply.as_numpy("citations")[0]),
              "parameters": {k: str(v).strip() for k, v in reply.get_response().parameters.items()}}
    for case, parameters in (("bad", {"temperature": "-1"}), ("float", {"temperature": 0.5})):
        try:
            client.infer(sys.argv[2], [prompt], parameters=parameters)
        except InferenceServerException as e:
            result[case] = {"status": e.status(), "message": e.message()}
    print(json.dumps(result))
""")


def test_v2_grpc_client_gets_a_completion(kserve_server):
    run = subprocess.run([sys.executable, "-c", V2_GRPC_CLIENT, f"127.0.0.1:{kserve_server.grpc_port}", MODEL,
                          PROMPT], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr + "\n" + kserve_server.log_tail()
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ready"] is True
    assert result["text"] == completion(kserve_server, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert "completion_tokens" in result["parameters"] and "12" in result["parameters"]["completion_tokens"]
    assert result["citations"] and len(result["citations"][0]["references"]) == 5
    assert "INVALID_ARGUMENT" in result["bad"]["status"]
    assert "temperature must be a finite number >= 0" in result["bad"]["message"]
    assert "INVALID_ARGUMENT" in result["float"]["status"] and "floats as strings" in result["float"]["message"]


def test_v2_rest_infer(kserve_server):
    status, _, body = kserve_server.post(f"/v2/models/{MODEL}/infer", {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}],
        "parameters": {"max_tokens": 12, "temperature": 0}})
    assert status == 200, body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["text"]["datatype"] == "BYTES" and outputs["text"]["shape"] == [1]
    text = outputs["text"]["data"][0]
    assert text == completion(kserve_server, max_tokens=12, temperature=0)["choices"][0]["text"]
    citations = json.loads(outputs["citations"]["data"][0])
    prompt_chunks = -(-body["parameters"]["prompt_tokens"] // 64)
    assert [c["chunk_index"] for c in citations] == list(range(prompt_chunks))
    assert body["parameters"]["completion_tokens"] == 12 and body["parameters"]["finish_reason"] == "length"


def test_openai_streaming_joins_to_the_completion(kserve_server):
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", kserve_server.http_port, timeout=120)
    try:
        connection.request("POST", "/v1/completions", json.dumps(request), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200, reply.read()
        assert reply.getheader("Content-Type").startswith("text/event-stream")
        events = [line.decode().strip() for line in reply if line.strip()]
    finally:
        connection.close()
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert len(chunks) > 3  # streamed, not one reply
    # A step whose token ends inside a character has no text yet: it sends no chunk.
    assert all(c["choices"][0]["text"] or c.get("citations") or c["choices"][0]["finish_reason"] for c in chunks)
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 40
    whole = completion(kserve_server, max_tokens=40, temperature=0)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert whole["usage"]["completion_tokens"] == 40 and whole["choices"][0]["finish_reason"] == "length"


def test_the_openai_sdk_lists_the_model_completes_and_streams(kserve_server):
    """The OpenAI Python SDK, pointed at /openai/v1: models, a completion, a stream, an error."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{kserve_server.http_port}/openai/v1", api_key="unused",
                           max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [MODEL]
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 24
    pieces = [chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)]
    assert len(pieces) > 3 and "".join(pieces) == whole.choices[0].text
    # With include_usage the stream ends with a chunk of no choices and the usage, which the SDK reads.
    *chunks, last = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                              stream_options={"include_usage": True})
    assert last.choices == [] and last.usage.completion_tokens == 24
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    with pytest.raises(openai.BadRequestError, match="temperature must be a finite number >= 0"):
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt=PROMPT)


def test_the_openai_sdk_chats_through_the_qa_template(kserve_server):
    """A chat is the completion of its messages written as the `qa` template writes them, ending at
    the answer's line end; streamed, its deltas join to the same message."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{kserve_server.http_port}/openai/v1", api_key="unused",
                           max_retries=0, timeout=120)
    messages = [{"role": "system", "content": "Short answers."}, {"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    same = client.completions.create(model=MODEL, prompt=f"Short answers.\nQuestion: {PROMPT}\nAnswer:",
                                     stop=["\n"], max_tokens=24, temperature=0)
    answer = chat.choices[0]
    assert chat.object == "chat.completion" and answer.message.role == "assistant"
    assert answer.message.content == same.choices[0].text and "\n" not in answer.message.content
    assert answer.finish_reason == same.choices[0].finish_reason
    assert chat.usage.prompt_tokens == same.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.message.content
    assert chunks[-1].choices[0].finish_reason == answer.finish_reason
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role must be one of"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])


def test_the_openai_sdk_reads_choices_penalties_and_logprobs(kserve_server):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{kserve_server.http_port}/openai/v1", api_key="unused",
                           max_retries=0, timeout=120)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, seed=5, temperature=1,
                                      logprobs=2, presence_penalty=0.5)
    assert [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == len(choice.logprobs.top_logprobs)
    assert whole.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in whole.choices)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, seed=5, temperature=1,
                                              presence_penalty=0.5, stream=True))
    for choice in whole.choices:
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == choice.index) == choice.text
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "The lighthouse"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    scored = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1)
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0
    assert len(scored.choices[0].logprobs.token_logprobs) == scored.usage.prompt_tokens - 1  # all but <s>
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=2, frequency_penalty=1.0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens  # one per generated token
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)


def test_a_client_that_hangs_up_frees_its_stream(kserve_server):
    tokens_before = metric(kserve_server, "memory3_generation_tokens_total")
    request = {"prompt": PROMPT, "max_tokens": 600, "temperature": 0, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", kserve_server.http_port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(request), {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    connection.close()  # hang up after the first chunk
    deadline = time.monotonic() + 20
    while metric(kserve_server, "memory3_num_requests_running") > 0:
        assert time.monotonic() < deadline, "the stream kept its batch slot after the client hung up"
        time.sleep(0.2)
    assert metric(kserve_server, "memory3_generation_tokens_total") - tokens_before < 600  # cancelled, not finished


def test_clients_that_hang_up_before_their_reply_free_their_slots(kserve_server):
    """Uvicorn and Starlette cancel nothing when a client hangs up: a non-streamed completion and a
    v2 inference generated to max_tokens for nobody, and a stream queued for a row kept its place."""
    tokens_before = metric(kserve_server, "memory3_generation_tokens_total")
    long = {"max_tokens": 900, "temperature": 0}
    completion_call = kserve_server.send_unread("/v1/completions", {"prompt": PROMPT, **long})
    inference_call = kserve_server.send_unread(f"/v2/models/{MODEL}/infer", v2_request(**long))
    wait_for_metric(kserve_server, "memory3_num_requests_running", 2, "both requests generating")
    queued_stream = kserve_server.send_unread("/v1/completions", {"prompt": PROMPT, "stream": True, **long})
    wait_for_metric(kserve_server, "memory3_num_requests_waiting", 1, "the stream queued for a row")
    queued_stream.close()
    wait_for_metric(kserve_server, "memory3_num_requests_waiting", 0, "the queued stream left the queue", within=2)
    assert metric(kserve_server, "memory3_num_requests_running") == 2
    completion_call.close()
    inference_call.close()
    wait_for_metric(kserve_server, "memory3_num_requests_running", 0, "both slots freed at the hang-up", within=3)
    assert metric(kserve_server, "memory3_generation_tokens_total") - tokens_before < 2 * 900  # cancelled


def test_a_client_that_leaves_a_stream_midway_frees_its_slot(kserve_server):
    connection = kserve_server.send_unread("/v1/completions", {"prompt": PROMPT, "stream": True, "max_tokens": 900,
                                                               "temperature": 0})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")  # streaming
    connection.close()
    wait_for_metric(kserve_server, "memory3_num_requests_running", 0, "the slot freed at the hang-up", within=3)


def test_the_per_client_stream_limit_holds_over_http(tmp_path, random_release, local_s3):
    """`--max-streams-per-client` applied to gRPC only: the HTTP doors passed no client id. A client is
    its `x-client-id` header, else its host."""
    server = start_kserve(tmp_path, random_release, local_s3, "--max-streams-per-client", "1")
    try:
        server.wait_for(server.ready, "ready")
        alice = {"x-client-id": "alice"}
        held = server.send_unread("/v1/completions", {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True}, alice)
        wait_for_metric(server, "memory3_num_requests_running", 1, "alice's first request generating")
        says = "client 'alice' already has 1 streams open"
        for path, body in [("/v1/completions", {"prompt": PROMPT}),
                           ("/v1/completions", {"prompt": PROMPT, "stream": True}),
                           (f"/v2/models/{MODEL}/infer", v2_request())]:
            status, _, reply = server.post(path, body, headers=alice)
            assert status == 429 and says in json.dumps(reply), (path, body, reply)
        status, _, reply = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2},
                                       headers={"x-client-id": "bob"})
        assert status == 200, reply
        status, _, reply = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 200, reply  # by its host, 127.0.0.1: no stream open yet
        held.close()
        wait_for_metric(server, "memory3_num_requests_running", 0, "alice's request cancelled at the hang-up")
        by_host = server.send_unread(f"/v2/models/{MODEL}/infer", v2_request(max_tokens=900))
        wait_for_metric(server, "memory3_num_requests_running", 1, "a request from 127.0.0.1 generating")
        status, _, reply = server.post(f"/v2/models/{MODEL}/infer", v2_request())
        assert status == 429 and "client '127.0.0.1' already has 1 streams open" in reply["error"], reply
        by_host.close()
        exits_on_sigterm(server)
    finally:
        server.stop()


def test_a_stream_cut_by_shutdown_ends_with_an_error_event_and_done(tmp_path, random_release, local_s3):
    """When SIGTERM's grace runs out the server cancels a stream still going: it ended mid-body, with no
    error event and no `data: [DONE]`, so a client could not tell it from a broken connection."""
    server = start_kserve(tmp_path, random_release, local_s3, "--grace", "1")
    try:
        server.wait_for(server.ready, "ready")
        request = {"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True}
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        connection.request("POST", "/v1/completions", json.dumps(request), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200 and reply.readline().startswith(b"data: ")
        server.process.terminate()
        events = [line.decode().strip() for line in reply if line.strip()]  # to the end of a whole body
        connection.close()
        assert events[-1] == "data: [DONE]", events[-3:]
        error = json.loads(events[-2][len("data: "):])["error"]
        assert error["code"] == 503 and "stopped this stream before it finished" in error["message"], error
        assert all('"finish_reason":null' in e for e in events[:-2])  # cut, not finished
        assert server.process.wait(timeout=30) == 0, server.log_tail()
    finally:
        server.stop()


@pytest.mark.parametrize(("fields", "status", "says"), [
    ({"temperature": -0.5}, 400, "temperature must be a finite number >= 0"),
    ({"top_p": 2}, 400, "top_p must be in [0, 1]"),
    ({"max_tokens": "many"}, 400, "max_tokens must be an integer"),
    ({"prompt": None}, 400, "prompt is required"),
    ({"prompt": ""}, 400, "the prompt is empty"),
    ({"max_tokens": 10**6, "stream": True}, 400, "max_tokens=1000000 does not fit"),
    ({"n": 0}, 400, "n must be 1 or more"),
    ({"best_of": 2}, 400, "best_of=2 with n=1"),
    ({"logit_bias": {"x": 1}}, 400, "logit_bias: at 'x': each key must be a token id"),
    ({"suffix": "."}, 400, "suffix is not supported"),
    ({"temprature": 0}, 400, "unknown field(s) ['temprature']"),
    ({"stop": [""]}, 400, "stop: at most 8 non-empty strings"),
    ({"model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
    ({"seed": 10**23}, 400, "seed must be a 64-bit signed integer"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options is only allowed with"),
    ({"stream": True, "stream_options": 7}, 400, "stream_options must be an object"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options must be an object"),
])
def test_openai_bad_input_says_what_to_fix(kserve_server, fields, status, says):
    got, headers, body = kserve_server.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, **fields})
    assert got == status, body
    assert headers["content-type"].startswith("application/json")  # an error, not a 200 stream
    assert says in body["error"]["message"], body


def test_bad_json_and_bad_v2_input(kserve_server):
    status, _, body = kserve_server.post("/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, _, body = kserve_server.post(f"/v2/models/{MODEL}/infer", {
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}]})
    assert status == 400 and "needs an input named 'text'" in body["error"], body
    status, _, body = kserve_server.post(f"/v2/models/{MODEL}/infer", {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}],
        "parameters": {"max_token": 3}})
    assert status == 400 and "unknown parameter 'max_token'" in body["error"], body
    for data, says in [([None], "must hold the prompt as a string, got NoneType"),
                       ([5], "must hold the prompt as a string, got int")]:
        status, _, body = kserve_server.post(f"/v2/models/{MODEL}/infer", {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": data}]})
        assert status == 400 and says in body["error"], body
    status, _, body = kserve_server.post(f"/v2/models/{MODEL}/infer", {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}] * 2})
    assert status == 400 and "2 inputs named 'text'" in body["error"], body
    status, _, body = kserve_server.post(f"/v2/models/{MODEL}/infer", {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}],
        "parameters": {"seed": 10**23}})
    assert status == 400 and "seed must be a 64-bit signed integer" in body["error"], body


def test_v2_malformed_requests_are_400_with_an_error_message(kserve_server):
    """The Open Inference Protocol's error for a bad request: 400 {"error": message}, not FastAPI's 422."""
    prompt = [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}]
    for body, says in [(b"not json", "the body is not valid JSON"),
                       ({}, "not a valid v2 request: inputs: Field required"),
                       ({"inputs": 5}, "inputs: Input should be a valid list"),
                       ({"inputs": prompt, "parameters": {"stop": ["\n", "x"]}},
                        "parameters.stop: must be a number or an integer or a boolean or a string")]:
        status, _, reply = kserve_server.post(f"/v2/models/{MODEL}/infer", body)
        assert status == 400 and set(reply) == {"error"} and says in reply["error"], (body, reply)


def test_v2_returns_only_the_requested_outputs(kserve_server):
    prompt = [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}]
    for wanted in (["text"], ["citations"], ["citations", "text"]):
        status, _, body = kserve_server.post(f"/v2/models/{MODEL}/infer", {
            "inputs": prompt, "outputs": [{"name": name} for name in wanted], "parameters": {"max_tokens": 2}})
        assert status == 200, body
        assert sorted(o["name"] for o in body["outputs"]) == sorted(wanted), body
    status, _, body = kserve_server.post(f"/v2/models/{MODEL}/infer", {
        "inputs": prompt, "outputs": [{"name": "text"}, {"name": "bogus"}]})
    assert status == 400, body
    assert body["error"] == "unknown output(s) ['bogus']; this model's outputs are ['text', 'citations']"


@pytest.mark.parametrize(("option", "says"), [
    (["--port", "18090"], "serve kserve takes no --port: it listens on --http-port"),
    (["--host", "10.1.2.3"], "serve kserve takes no --host: KServe binds all interfaces"),
    (["--host", "127.0.0.1"], "serve kserve takes no --host: KServe binds all interfaces"),  # the others' default
    (["--max-connection-age", "30"], "serve kserve takes no --max-connection-age: its servers are KServe's"),
])
def test_serve_kserve_refuses_port_and_host(capsys, monkeypatch, option, says):
    """They were accepted and ignored: KServe listened on --http-port and --grpc-port, on every interface."""
    for name in ("MEMORY3_AUTH_TOKEN", "MEMORY3_S3_ENDPOINT"):  # without the refusal: a quick error, no server
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "kserve", "--release", "any", *option]) == 2
    assert says in capsys.readouterr().err


def test_readiness_follows_the_text_and_memory_services(tmp_path, random_release, local_s3, dependencies):
    """Ready only once the engine runs and both services answered; with the "fail" policy (the default)
    not ready while one is down, as `serve decoder` is NOT_SERVING: every request would fail."""
    text, memory = dependencies
    server = start_kserve(tmp_path, random_release, local_s3, "--text-address", text.address,
                          "--memory-address", memory.address)
    try:
        server.wait_for(lambda: "waiting for the text and memory services" in server.log_tail(), "waiting")
        assert server.readiness() == (503, 503)
        text.serving(True)
        memory.serving(True)
        server.wait_for(lambda: server.readiness() == (200, 200), "ready once both answered", timeout=15)
        text.serving(False)
        server.wait_for(lambda: server.readiness() == (503, 503), "unready with the text service down", timeout=15)
        assert server.status("/memory3/live") == 200  # a dependency down is no reason to restart the decoder
        status, _, body = server.post(f"/v2/models/{MODEL}/infer", {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}]})
        assert status == 503 and "error" in body, body
        text.serving(True)
        server.wait_for(lambda: server.readiness() == (200, 200), "ready with the text service back", timeout=15)
        exits_on_sigterm(server)
    finally:
        server.stop()


def test_under_the_continue_policy_a_decoder_started_in_an_outage_is_ready(tmp_path, random_release, local_s3,
                                                                          dependencies):
    """It waited for the services under either policy: a pod started while they were down never turned
    ready, and its startup probe restarted it until they came back. Under "continue" it serves without memory."""
    text, memory = dependencies
    server = start_kserve(tmp_path, random_release, local_s3, "--text-address", text.address,
                          "--memory-address", memory.address, "--retrieval-policy", "continue")
    try:
        server.wait_for(lambda: server.readiness() == (200, 200), "ready with both services down", timeout=60)
        assert "serving without memory until the text and memory services answer" in server.log_tail()
        status, _, body = server.post(f"/v2/models/{MODEL}/infer", {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}]})
        assert status == 200, body
        exits_on_sigterm(server)
    finally:
        server.stop()


def test_sigterm_ends_the_wait_for_the_text_and_memory_services(tmp_path, random_release, local_s3, dependencies):
    """SIGTERM stopped the HTTP and gRPC servers, but the process kept waiting for its dependencies."""
    text, memory = dependencies
    server = start_kserve(tmp_path, random_release, local_s3, "--text-address", text.address,
                          "--memory-address", memory.address)
    try:
        server.wait_for(lambda: "waiting for the text and memory services" in server.log_tail(), "waiting")
        exits_on_sigterm(server, within=15)
    finally:
        server.stop()
