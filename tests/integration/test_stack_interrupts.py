"""The local stack interrupted on its way up: a Ctrl-C while a store starts, a closed terminal
(SIGHUP) while `up` trains, an `up` killed outright. Real rclone and redis-server processes;
nothing the stack started may run on once the command that started it says it is stopped."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from memory3.services.stack import _alive
from memory3.services.storage import local_redis, local_s3
from memory3.services.storage.local_s3 import free_port

pytestmark = pytest.mark.integration


def ctrl_c_first(wait):
    """`wait`, with a real SIGINT delivered to this process just before it: the Ctrl-C of a user
    who gives up while a server starts."""
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return wait(*args, **kwargs)
    return interrupted


def pids_running(text: str) -> list[int]:
    """The live processes whose command line holds `text` (a test's own directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace") \
                    and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal, whatever this test run was started with (a
    shell starts background jobs with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_the_s3_server_starts_leaves_no_server(tmp_path, monkeypatch, ctrl_c_raises):
    """The server was spawned but not yet returned: `up` had no PID to stop, and said it had stopped all."""
    monkeypatch.setattr(local_s3.socket, "create_connection", ctrl_c_first(socket.create_connection))
    data = str(tmp_path / "s3-data")
    try:
        with pytest.raises(KeyboardInterrupt):
            local_s3.start_local_s3(tmp_path / "s3-data")
        assert pids_running(data) == []
    finally:  # what a failing run left
        for pid in pids_running(data):
            os.kill(pid, signal.SIGKILL)


def test_a_ctrl_c_while_redis_starts_leaves_no_server(tmp_path, monkeypatch, ctrl_c_raises):
    monkeypatch.setattr(local_redis, "_answers_ping", ctrl_c_first(local_redis._answers_ping))
    server = local_redis.LocalRedis(tmp_path / "redis", free_port())
    try:
        with pytest.raises(KeyboardInterrupt):
            server.start()
        assert server.process is not None and server.process.poll() is not None
    finally:  # what a failing run left
        if server.process is not None and server.process.poll() is None:
            server.kill()


@pytest.fixture
def home(tmp_path):
    """The stack's home; whatever a failing test left running there is stopped by PID."""
    yield tmp_path / "home"
    subprocess.run([sys.executable, "-m", "memory3.services.cli.main", "down", "--home", str(tmp_path / "home")],
                   capture_output=True, timeout=120)


def up_until_it_trains(home: Path) -> tuple[subprocess.Popen, list[int]]:
    """`memory3 up --quick` in an empty home, once its stores run and it starts training; their PIDs.
    SIGHUP as in a terminal, whatever this test run was started with (`nohup` ignores it)."""
    up = subprocess.Popen([sys.executable, "-m", "memory3.services.cli.main", "up", "--quick", "--home", str(home)],
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    for line in up.stderr:
        if "not in the bucket: training" in line:
            break
    state = json.loads((home / "stack" / "state.json").read_text())
    return up, [p["pid"] for p in state["processes"]]


def memory3(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memory3.services.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_a_closed_terminal_while_up_trains_stops_what_it_started(home):
    """SIGHUP killed `up` where it was, and the S3 server and Redis ran on with no `up` to stop them."""
    up, pids = up_until_it_trains(home)
    try:
        assert len(pids) == 2 and all(map(_alive, pids))
        up.send_signal(signal.SIGHUP)
        assert up.wait(timeout=60) == 128 + signal.SIGHUP
        assert up.stderr.read().endswith("memory3 up: interrupted (SIGHUP); what it had started is stopped\n")
    finally:
        up.kill()
        up.stderr.close()
    assert not any(map(_alive, pids)) and not (home / "stack" / "state.json").exists()


def test_a_stack_whose_up_was_killed_is_neither_up_nor_a_traceback(home):
    """SIGKILL (or the OOM killer) leaves the stores running: `status` said up (exit 0), `generate`
    ended in a KeyError traceback, and `demo` asked a stack without services."""
    up, pids = up_until_it_trains(home)
    up.kill()
    up.wait()
    up.stderr.close()
    status = memory3("status", "--home", str(home))
    assert status.returncode == 1 and "decoder           -  -                 not started" in status.stdout
    generate = memory3("generate", "hi", "--home", str(home))
    assert generate.returncode == 2 and generate.stderr.count("\n") == 1
    assert "was left half-started (text, memory, decoder not running" in generate.stderr
    down = memory3("down", "--home", str(home))
    assert down.returncode == 0 and not any(map(_alive, pids))


# `up` as `memory3 up` runs it, killed outright (SIGKILL, the OOM killer) just as it starts Redis.
KILLED_WHILE_REDIS_STARTS = """
import os, signal, sys
from pathlib import Path
from memory3.services import stack

def killed(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

stack.start_local_redis = killed
stack.start_stack(stack.StackOptions(home=Path(sys.argv[1]), release="r"), log=print)
"""


def test_an_up_killed_while_its_stores_start_leaves_nothing_down_cannot_stop(home):
    """The state was first saved once both stores ran: the S3 server of an `up` killed before then ran on, and
    `down` said no stack was running."""
    try:
        up = subprocess.run([sys.executable, "-c", KILLED_WHILE_REDIS_STARTS, str(home)], capture_output=True,
                            text=True, timeout=120)
        assert up.returncode == -signal.SIGKILL, up.stderr
        assert pids_running(str(home)), "no S3 server was started"
        state = json.loads((home / "stack" / "state.json").read_text())
        assert [p["name"] for p in state["processes"]] == ["s3"]
        down = memory3("down", "--home", str(home))
        assert down.returncode == 0 and f"stopped s3 (pid {state['processes'][0]['pid']})" in down.stderr
        assert pids_running(str(home)) == []
    finally:  # what a failing run left
        for pid in pids_running(str(home)):
            os.kill(pid, signal.SIGKILL)
