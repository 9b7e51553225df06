"""SIGTERM on `memory3 serve kserve`: the engine drains before KServe's servers stop.

Uvicorn took the signal first and drained HTTP alone: meanwhile the readiness routes and v2 gRPC
said ready (or refused the connection), v2 gRPC took new requests, and queued requests waited for
a row, only to be cut with a bare 500 when the grace period ended. As `serve decoder` does, the
server now turns not ready, refuses new requests and fails the queued ones with 503/UNAVAILABLE at
once, lets the running streams finish within `--grace`, and only then stops its servers.
"""

import http.client
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_kserve import MODEL, PROMPT, KServeProcess, start_kserve, v2_request, wait_for_metric

pytestmark = pytest.mark.integration

# A v2 gRPC client armed before the signal, so that its checks take milliseconds once told to go:
# tritonclient takes seconds to import, longer than the drain may last here.
ARMED_GRPC_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(sys.argv[1])
    print(json.dumps({"armed": client.is_server_ready()}), flush=True)
    sys.stdin.readline()
    result = {"server_ready": client.is_server_ready(), "model_ready": client.is_model_ready(sys.argv[2])}
    prompt = triton.InferInput("text", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a new request"], dtype=object))
    try:
        client.infer(sys.argv[2], [prompt], parameters={"max_tokens": 4}, client_timeout=20)
        result["infer"] = {"status": "OK"}
    except InferenceServerException as e:
        result["infer"] = {"status": e.status(), "message": e.message()}
    print(json.dumps(result), flush=True)
""")


class ArmedGrpcClient:
    def __init__(self, server: KServeProcess) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", ARMED_GRPC_CLIENT, f"127.0.0.1:{server.grpc_port}", MODEL],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        armed = self.process.stdout.readline()
        assert armed and json.loads(armed) == {"armed": True}, self.process.stderr.read()

    def go(self) -> dict:
        out, err = self.process.communicate("go\n", timeout=60)
        assert self.process.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def open_stream(server: KServeProcess, max_tokens: int = 900) -> http.client.HTTPResponse:
    """A streamed completion whose first chunk arrived: it holds a batch row."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(
        {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    return reply


def read_events(reply: http.client.HTTPResponse) -> list[dict | str]:
    """The rest of an SSE stream: each event's JSON, and `[DONE]` as a string."""
    events = [line.decode().strip()[len("data: "):] for line in reply if line.strip()]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def reply_of(connection: http.client.HTTPConnection) -> tuple[int, dict]:
    reply = connection.getresponse()
    body = reply.read()
    try:
        return reply.status, json.loads(body)
    except ValueError:
        return reply.status, {"raw": body.decode(errors="replace")}


def post_status(server: KServeProcess, path: str, body: dict) -> tuple[int, dict]:
    """A request's status and JSON body; 0 when the server refused the connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return reply_of(connection)
    except ConnectionError:
        return 0, {}
    finally:
        connection.close()


def exit_code(server: KServeProcess, within: float) -> int:
    try:
        return server.process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"memory3 serve kserve still ran {within:g} s after SIGTERM:\n{server.log_tail()}")


def test_sigterm_drains_the_engine_before_the_servers_stop(tmp_path, random_release, local_s3):
    """Not ready and refusing new requests at once, queued requests failed with a retryable 503 at
    once, the running stream finished whole, then a clean exit."""
    server = start_kserve(tmp_path, random_release, local_s3, "--max-batch", "1", "--grace", "60")
    grpc_client = None
    try:
        server.wait_for(server.ready, "ready")
        grpc_client = ArmedGrpcClient(server)
        running = open_stream(server)
        queued_infer = server.send_unread(f"/v2/models/{MODEL}/infer", v2_request(max_tokens=8))
        queued_stream = server.send_unread("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "stream": True})
        wait_for_metric(server, "memory3_num_requests_waiting", 2, "two requests queued behind the stream")
        signalled = time.monotonic()
        server.process.terminate()

        status, body = reply_of(queued_infer)
        assert status == 503 and "retry it on another replica" in body.get("error", ""), (status, body)
        status, body = reply_of(queued_stream)
        assert status == 503 and "retry it on another replica" in body["error"]["message"], (status, body)
        assert time.monotonic() - signalled < 20  # at once, not when the running stream ends
        assert server.readiness() == (503, 503)
        status, body = post_status(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
        assert status == 503 and "retry the request on another replica" in body["error"]["message"], (status, body)
        probe = grpc_client.go()
        assert probe["server_ready"] is False and probe["model_ready"] is False, probe
        assert "UNAVAILABLE" in probe["infer"]["status"] and "another replica" in probe["infer"]["message"], probe

        events = read_events(running)
        assert events[-1] == "[DONE]", events[-3:]
        assert events[-2]["choices"][0]["finish_reason"] == "length", events[-2]  # whole, not cut
        assert exit_code(server, within=60) == 0, server.log_tail()
    finally:
        if grpc_client is not None:
            grpc_client.close()
        server.stop()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_cuts_the_drain_short(tmp_path, random_release, local_s3, second):
    """A second SIGTERM or SIGINT during the drain stops the servers at once, long before `--grace`:
    the running stream says it was cut, and requests not answered yet get a retryable 503, not
    Uvicorn's bare 500."""
    server = start_kserve(tmp_path, random_release, local_s3, "--max-batch", "3", "--grace", "120")
    try:
        server.wait_for(server.ready, "ready")
        running = open_stream(server)
        inference = server.send_unread(f"/v2/models/{MODEL}/infer", v2_request(max_tokens=900, temperature=0))
        completion = server.send_unread("/v1/completions", {"prompt": PROMPT, "max_tokens": 900, "temperature": 0})
        wait_for_metric(server, "memory3_num_requests_running", 3, "three requests generating")
        server.process.terminate()
        server.wait_for(lambda: server.readiness() == (503, 503), "draining", timeout=20)
        server.process.send_signal(second)
        events = read_events(running)
        assert events[-1] == "[DONE]", events[-3:]
        assert events[-2]["error"]["code"] == 503, events[-2]
        assert "stopped this stream before it finished" in events[-2]["error"]["message"]
        status, body = reply_of(inference)
        assert status == 503 and "stopped this request before it finished" in body.get("error", ""), (status, body)
        status, body = reply_of(completion)
        assert status == 503, (status, body)
        assert "stopped this request before it finished" in body["error"]["message"], body
        assert exit_code(server, within=30) == 0, server.log_tail()
    finally:
        server.stop()
