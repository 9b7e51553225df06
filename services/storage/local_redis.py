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
from pathlib import Path

from .local_s3 import free_port


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
    """One redis-server process on a fixed port; `start()` again after `stop()`/`kill()` restarts it."""

    def __init__(self, data_dir: Path, port: int, *, maxmemory: str | None = None, password: str | None = None,
                 ready_timeout: float = 10.0) -> None:
        self.data_dir, self.port, self.maxmemory, self.ready_timeout = data_dir, port, maxmemory, ready_timeout
        self.password = password
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

    def start(self) -> LocalRedis:
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
               "--appendonly", "no", "--daemonize", "no", "--dir", str(self.data_dir),
               "--pidfile", str(self.data_dir / "redis.pid"), "--logfile", str(self.data_dir / "redis.log"),
               "--maxmemory-policy", "allkeys-lru"]
        if self.maxmemory:
            cmd += ["--maxmemory", self.maxmemory]
        if self.password:  # in a 0600 config file, not on the command line (ps would show it)
            config = self.data_dir / "redis-auth.conf"
            config.touch(mode=0o600)
            config.write_text(f"requirepass {self.password}\n")
            cmd.insert(1, str(config))
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode} "
                                   f"(see {self.data_dir / 'redis.log'}; is port {self.port} taken?)")
            if _answers_ping(self.port, password=self.password):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{self.port} within {self.ready_timeout}s")

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
