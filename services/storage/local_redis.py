"""A real Redis on 127.0.0.1 for tests and the local stack: Debian's `redis-server`.

Started in the foreground as our child (no daemonizing, so we hold its PID), with persistence off
(memories are a cache of the object store) and `allkeys-lru` eviction. Stopped, killed and
restarted by PID on the same port, so fault tests can take the cache away and bring it back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .local_s3 import free_port, listens


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("redis-server not found: apt-get install redis-server")
    return found


def _answers_ping(port: int, timeout: float = 0.2, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                if not s.recv(16).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class LocalRedis:
    """One redis-server process on a fixed port; `start()` again after `stop()`/`kill()` restarts it.

    `extra_args` are more of redis-server's options, e.g. `--replicaof 127.0.0.1 PORT` for a
    replica or `--cluster-enabled yes` for a cluster node.
    """

    def __init__(self, data_dir: Path, port: int, *, maxmemory: str | None = None, password: str | None = None,
                 ready_timeout: float = 10.0, extra_args: Sequence[str] = ()) -> None:
        self.data_dir, self.port, self.maxmemory, self.ready_timeout = data_dir, port, maxmemory, ready_timeout
        self.password, self.extra_args = password, list(extra_args)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """With the password when there is one: keep it out of logs (redis_tier.redacted)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        cmd = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
               "--appendonly", "no", "--daemonize", "no", "--dir", str(self.data_dir),
               "--pidfile", str(self.data_dir / "redis.pid"), "--logfile", str(self.data_dir / "redis.log"),
               "--maxmemory-policy", "allkeys-lru", *self.extra_args]
        if self.maxmemory:
            cmd += ["--maxmemory", self.maxmemory]
        if self.password:  # in a 0600 config file, not on the command line (ps would show it)
            config = self.data_dir / "redis-auth.conf"
            config.touch(mode=0o600)
            config.write_text(f"requirepass {self.password}\n")
            cmd.insert(1, str(config))
        return cmd

    def start(self) -> LocalRedis:
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:  # a Ctrl-C or SIGTERM while it starts too: the caller never got it to stop
            self.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until the server we started answers PING: an answer from another one on the port (taken
        since it was chosen) does not count, as that one would be used in its place."""
        deadline = time.monotonic() + self.ready_timeout
        taken = f"is port {self.port} taken?"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode} "
                                   f"(see {self.data_dir / 'redis.log'}; {taken})")
            if _answers_ping(self.port, password=self.password):
                if listens(self.process.pid, self.port) is not False:
                    return
                taken = f"another process listens on 127.0.0.1:{self.port} and answered: the port was taken"
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{self.port} within "
                           f"{self.ready_timeout}s ({taken})")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if not self.running:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the cache vanishes at once, as in a crash."""
        if not self.running:
            return
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_local_redis(data_dir: Path, *, port: int | None = None, maxmemory: str | None = None,
                      password: str | None = None, ready_timeout: float = 10.0) -> LocalRedis:
    """Start redis-server on 127.0.0.1 (a free port unless given) and wait until it answers PING."""
    return LocalRedis(data_dir, port or free_port(), maxmemory=maxmemory, password=password,
                      ready_timeout=ready_timeout).start()


class LocalSentinel(LocalRedis):
    """A Sentinel (`redis-server --sentinel`) watching one primary as `service`, quick to fail over:
    the primary counts as down after `down_after_ms` without an answer."""

    def __init__(self, data_dir: Path, port: int, *, primary_port: int, service: str = "memory3",
                 down_after_ms: int = 500, failover_timeout_ms: int = 2000, ready_timeout: float = 10.0) -> None:
        super().__init__(data_dir, port, ready_timeout=ready_timeout)
        self.primary_port, self.service = primary_port, service
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms

    def command(self) -> list[str]:
        config = self.data_dir / "sentinel.conf"  # Sentinel rewrites its config file: one of its own
        if not config.exists():
            config.write_text(f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
                              f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                              f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n")
        return [redis_server_binary(), str(config), "--sentinel", "--bind", "127.0.0.1", "--port", str(self.port),
                "--daemonize", "no", "--dir", str(self.data_dir), "--logfile", str(self.data_dir / "sentinel.log")]

    def primary(self) -> tuple[str, int] | None:
        """The address the Sentinel gives for its service now."""
        import redis

        with redis.Redis(port=self.port, socket_timeout=1.0, decode_responses=True) as client:
            address = client.sentinel_get_master_addr_by_name(self.service)
        return (address[0], int(address[1])) if address else None


def start_local_cluster(data_dir: Path, *, nodes: int = 3, node_timeout_ms: int = 1000,
                        ready_timeout: float = 30.0) -> list[LocalRedis]:
    """A Redis Cluster of `nodes` primaries on free ports, every slot assigned (`redis-cli --cluster
    create`), returned once each node reports `cluster_state:ok`. Stop each node by PID."""
    import redis

    servers: list[LocalRedis] = []
    try:
        for i in range(nodes):
            servers.append(LocalRedis(data_dir / f"node-{i}", free_port(), extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()),  # not port + 10000, which may be taken or past 65535
                "--cluster-node-timeout", str(node_timeout_ms)]).start())
        cli = shutil.which("redis-cli")
        if not cli:
            raise RuntimeError("redis-cli not found: apt-get install redis-tools")
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True,
                       timeout=ready_timeout)
        deadline = time.monotonic() + ready_timeout
        for server in servers:
            with redis.Redis(port=server.port, socket_timeout=1.0, decode_responses=True) as client:
                while client.cluster("info").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the cluster node on port {server.port} is not ok after {ready_timeout}s")
                    time.sleep(0.1)
        return servers
    except BaseException:
        for server in servers:
            server.kill()
        raise
