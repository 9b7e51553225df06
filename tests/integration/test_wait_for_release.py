"""`serve --wait-for-release`: a service installed beside the Job that publishes its release waits for it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from release_fixtures import build_random_release

from memory3.services.storage.local_s3 import free_port

pytestmark = pytest.mark.integration


def serve_memory(local_s3, tmp_path, release: str, wait_s: float, port: int) -> subprocess.Popen:
    env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": local_s3.config.access_key,
           "MEMORY3_S3_SECRET_KEY": local_s3.config.secret_key}
    return subprocess.Popen(
        [sys.executable, "-m", "memory3.services.cli.main", "serve", "memory", "--release", release,
         "--wait-for-release", str(wait_s), "--port", str(port), "--s3-endpoint", local_s3.config.endpoint,
         "--s3-bucket", local_s3.config.bucket, "--cache-dir", str(tmp_path), "--grace", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_service_waits_for_its_release_to_be_published(store, local_s3, tmp_path):
    """The chart installs the services beside the trainer Job that publishes their release: they
    exited at once (CrashLoopBackOff) instead of waiting in their startup probe, as documented."""
    name, port = f"later-{uuid.uuid4().hex[:8]}", free_port()
    process = serve_memory(local_s3, tmp_path, name, 120, port)
    try:
        time.sleep(4)
        assert process.poll() is None, process.communicate()[1][-2000:]  # still waiting
        build_random_release(store, name)
        deadline = time.monotonic() + 60
        while not serving(port):
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the service never served the release once published"
            time.sleep(0.3)
    finally:
        process.terminate()
        process.wait(30)


def test_a_release_still_missing_when_the_wait_ends_is_an_error(local_s3, tmp_path):
    process = serve_memory(local_s3, tmp_path, f"never-{uuid.uuid4().hex[:8]}", 1, free_port())
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2, err[-2000:]
    assert "after 1 s, 1 of 1 releases are not published" in err
