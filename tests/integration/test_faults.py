"""Faults injected into the whole stack (as processes), each survived: overload, S3 killed and
restarted, slow S3, the text service down under each retrieval policy, a greedy client, a
tampered release, and credentials that never reach a log.

Covered elsewhere, not repeated here: Redis killed mid-stream and restarted, a corrupt blob, and
decoder SIGTERM (test_generation_stack.py); Redis and S3 faults at the memory service
(test_memory_service.py); trainer SIGKILL and resume (test_training.py); interrupted release
publication (test_release.py). The fault functions are those of `memory3 bench reliability`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memory3.bench import reliability as rel
from memory3.services.release.manifest import ReleaseError, release_key
from memory3.services.release.reader import Release

pytestmark = pytest.mark.integration


def survived(result: dict) -> dict:
    assert result["survived"], json.dumps(result, indent=1)[:3000]
    assert result.get("lost", 0) == 0
    return result


def test_overload_is_refused_fast_and_leaves_nothing_behind(reliability_stack):
    rs = reliability_stack
    result = rel.overload(rs, seconds=2.0, new_tokens=16)
    assert set(result["by_code"]) == {"OK", "RESOURCE_EXHAUSTED"}, result["details"]
    assert result["timeouts"] == 0 and result["lost"] == 0
    assert result["resource_exhausted_latency"]["p99_ms"] < 1000  # refused at once, not queued
    assert result["gauges_return_to_zero"]
    assert result["rss_flat"], result["rss_mb_per_run"]
    assert not rs.crashed()


def test_s3_killed_fails_fast_or_continues_by_policy_then_recovers(reliability_stack):
    result = survived(rel.fault_s3_restart(reliability_stack))
    assert result["fail_policy"]["error_latency"]["p99_ms"] < 5000  # UNAVAILABLE, well before any deadline


def test_slow_s3_is_survived_and_a_short_deadline_is_honoured(reliability_stack):
    result = survived(rel.fault_slow_s3(reliability_stack))
    assert result["short_deadline"]["by_code"] == {"DEADLINE_EXCEEDED": 2}


def test_text_service_down_per_policy(reliability_stack):
    result = survived(rel.fault_text_down(reliability_stack))
    assert result["fail_policy"]["error_latency"]["p99_ms"] < 2000  # fail fast
    assert result["continue_policy"]["warned"] == result["continue_policy"]["requests"]  # said so in the response


def test_streams_per_client_are_limited(reliability_stack):
    survived(rel.fault_client_stream_limit(reliability_stack))


def test_tampered_weights_are_refused_with_a_clear_error(reliability_stack, tmp_path):
    """A release whose weights were changed in S3 after publication: opened by nobody."""
    rs, name = reliability_stack, "tampered-weights"
    store = rs.store
    prefix = release_key(rel.RELEASE, "")
    for key in store.list_keys(prefix):
        store.put_bytes(release_key(name, key[len(prefix):]), store.get_bytes(key))
    weights = release_key(name, "model/model.safetensors")
    data = bytearray(store.get_bytes(weights))
    data[-3] ^= 0x01  # one bit of one weight
    store.put_bytes(weights, bytes(data))
    with pytest.raises(ReleaseError, match="model/model.safetensors does not match its manifest checksum"):
        Release.open(store, name, tmp_path / "cache")
    env = {**os.environ, "MEMORY3_S3_ACCESS_KEY": rs.s3.config.access_key,
           "MEMORY3_S3_SECRET_KEY": rs.s3.config.secret_key}
    served = subprocess.run([sys.executable, "-m", "memory3.services.cli.main", "serve", "decoder", "--release", name,
                             "--port", "0", "--s3-endpoint", rs.s3.config.endpoint, "--cache-dir",
                             str(tmp_path / "decoder")], env=env, capture_output=True, text=True, timeout=120)
    assert served.returncode != 0
    assert "does not match its manifest checksum" in served.stderr, served.stderr[-2000:]


def test_credentials_never_reach_logs_or_command_lines(reliability_stack):
    """Last: after the faults above (and a Redis outage) every service has logged its errors."""
    rs = reliability_stack
    survived(rel.fault_redis_restart(rs, seconds=3.0, new_tokens=8))
    assert rs.redis_password in rs.state.redis_url  # the services were given a password-protected URL
    memory_log = Path(rs.process("memory").log).read_text()
    assert "Redis at redis://127.0.0.1" in memory_log  # the outage was logged, redacted
    assert rs.secrets_in_logs() == []
    pids = {p.name: p.pid for p in rs.state.processes} | {"s3": rs.s3.process.pid}  # S3 started apart
    for name, pid in pids.items():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        assert rs.s3.config.secret_key not in cmdline and rs.redis_password not in cmdline, name
