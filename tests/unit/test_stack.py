"""The local stack's bookkeeping (`memory3 up`, `down`, `status` and the commands that find the stack):
which recorded processes are the stack's, one `up`/`down` at a time, and the messages a stack that is
partly down, corrupt or in another home gets. Real processes are `sleep`s, stopped by each test."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from memory3.services.cli import stack_commands
from memory3.services.cli.main import DEFAULT_HOME, home_option, main, s3_config
from memory3.services.stack import (
    StackOptions,
    StackProcess,
    StackState,
    _alive,
    process_start_time,
    process_state,
    stack_is_up,
    stack_lock,
    start_stack,
    state_path,
    stop_stack,
)
from memory3.services.storage.object_store import S3Config

DEAD_PID = 4_000_000  # above Linux's pid_max limit (2^22): never a process


@pytest.fixture
def sleepers():
    """Start `sleep` processes on demand; each is killed and reaped at the end."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen(["sleep", "120"])
        started.append(process)
        return process
    yield start
    for process in started:
        process.kill()
        process.wait()


def ours(name: str, process: subprocess.Popen, port: int = 1) -> StackProcess:
    """A recorded process that is the one with that PID (its start time is recorded)."""
    return StackProcess(name, process.pid, port, f"{name}.log", started=process_start_time(process.pid))


def reused(name: str, process: subprocess.Popen) -> StackProcess:
    """A recorded process whose PID another process has now (its start time differs)."""
    return StackProcess(name, process.pid, 1, f"{name}.log", started=process_start_time(process.pid) - 1)


def save_state(home: Path, *processes: StackProcess, bucket: str = "memory3") -> StackState:
    state = StackState(str(home), "r", dataclasses.asdict(S3Config("127.0.0.1:9", "k", bucket=bucket)), None,
                       list(processes))
    state.save(state_path(home))
    return state


def store_args(home: Path, bucket: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(s3_endpoint=None, s3_bucket=bucket, s3_secure=False, home=home)


# -- a recorded PID is the stack's only while its process is the one recorded --

def test_down_leaves_alone_a_process_that_merely_has_a_recorded_pid(tmp_path, sleepers):
    """PIDs are reused (reboots, containers): `down` SIGTERMed whatever process had one now."""
    stranger, own = sleepers(), sleepers()
    home = tmp_path / "home"
    save_state(home, reused("s3", stranger), ours("redis", own), StackProcess("decoder", DEAD_PID, 2, "d.log"))
    said: list[str] = []
    assert stop_stack(home, log=said.append)
    assert stranger.poll() is None and _alive(stranger.pid)  # not signalled
    assert own.wait(timeout=20) is not None  # the stack's own process is stopped
    assert f"s3 had exited (pid {stranger.pid} is another process's now: left alone)" in said
    assert f"stopped redis (pid {own.pid})" in said


def test_status_and_the_commands_that_find_the_stack_do_not_count_a_reused_pid(tmp_path, sleepers):
    stranger, own = sleepers(), sleepers()
    home = tmp_path / "home"
    save_state(home, reused("s3", stranger), ours("redis", own))
    assert process_state(reused("s3", stranger)) == "exited"
    assert process_state(ours("redis", own)) == "running"
    assert stack_is_up(home) is None
    save_state(home, ours("s3", stranger), ours("redis", own))
    assert stack_is_up(home) is not None


def test_up_on_a_partly_down_stack_stops_only_its_own_processes(tmp_path, sleepers, monkeypatch):
    stranger, own = sleepers(), sleepers()
    home = tmp_path / "home"
    save_state(home, reused("s3", stranger), ours("redis", own))

    class Unreachable:  # the store of the new stack: the test ends there
        def __init__(self, _config):
            pass

        def ensure_bucket(self):
            raise ConnectionError("no store in this test")
    monkeypatch.setattr("memory3.services.storage.object_store.ObjectStore", Unreachable)
    said: list[str] = []
    with pytest.raises(ConnectionError):
        start_stack(StackOptions(home=home, release="r", redis=False, s3=S3Config("127.0.0.1:9", "k")),
                    log=said.append)
    assert said[0] == "the last stack is partly down (s3 not running): stopping the rest"
    assert stranger.poll() is None and own.wait(timeout=20) is not None


def test_a_state_file_without_start_times_is_read_as_before(tmp_path, sleepers):
    """A state written before start times were recorded: any live process with the PID counts."""
    own = sleepers()
    home = tmp_path / "home"
    state_path(home).parent.mkdir(parents=True)
    state_path(home).write_text(json.dumps({
        "home": str(home), "release": "r", "s3": dataclasses.asdict(S3Config("127.0.0.1:9", "k")), "redis_url": None,
        "processes": [{"name": "s3", "pid": own.pid, "port": 1, "log": "s3.log", "metrics_port": None,
                       "log_start": 0}]}))
    state = stack_is_up(home)
    assert state is not None and state.process("s3").started is None
    assert stop_stack(home, log=lambda _m: None) and own.wait(timeout=20) is not None


def test_a_spawned_process_is_recorded_with_its_start_time(sleepers):
    process = sleepers()
    started = process_start_time(process.pid)
    with open(f"/proc/{process.pid}/stat") as f:
        assert started == int(f.read().split()[21])  # field 22 ("sleep" has no space in its name)
    assert process_start_time(DEAD_PID) is None


# -- one `up` or `down` at a time in a home --

def test_up_and_down_are_refused_while_another_holds_the_home(tmp_path, sleepers):
    """Two `up`s at once both started a stack; the state kept the second's and `down` never stopped the first."""
    home = tmp_path / "home"
    own = sleepers()
    save_state(home, ours("s3", own))
    with stack_lock(home):
        for run in (lambda: start_stack(StackOptions(home=home, release="r")), lambda: stop_stack(home)):
            with pytest.raises(RuntimeError) as refused:
                run()
            assert str(refused.value) == (f"another memory3 command (pid {os.getpid()}) is starting or stopping the "
                                          f"stack in {home}: wait for it to end (or stop it), then run this again")
        cli = subprocess.run([sys.executable, "-m", "memory3.services.cli.main", "down", "--home", str(home)],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2 and cli.stderr.count("\n") == 1
        assert f"memory3 down: error: another memory3 command (pid {os.getpid()})" in cli.stderr
        assert own.poll() is None
    assert stop_stack(home, log=lambda _m: None) and own.wait(timeout=20) is not None  # free again


def test_the_lock_is_not_held_by_the_processes_started_under_it(tmp_path, sleepers):
    """The stores and services `up` starts run on after it: they must not keep the home locked."""
    home = tmp_path / "home"
    with stack_lock(home):
        child = subprocess.Popen(["sleep", "120"], close_fds=False)
    try:
        with stack_lock(home):
            pass
    finally:
        child.kill()
        child.wait()


def test_down_in_a_home_where_nothing_was_started_creates_nothing(tmp_path):
    said: list[str] = []
    assert not stop_stack(tmp_path / "typo", log=said.append)
    assert said == ["no stack is running (no state file)"] and not (tmp_path / "typo").exists()


# -- a stack partly down --

def test_generate_on_a_partly_down_stack_says_what_is_down(tmp_path, sleepers):
    home = tmp_path / "home"
    save_state(home, ours("s3", sleepers()), StackProcess("memory", DEAD_PID, 2, "m.log"),
               ours("decoder", sleepers(), port=3))
    with pytest.raises(RuntimeError) as failed:
        stack_commands.decoder_address(home, None, " --home h")
    assert str(failed.value) == (
        f"no decoder address: the local stack in {home} is partly down (memory not running): `memory3 status "
        "--home h` shows it; `memory3 down --home h` then `memory3 up --home h` starts it again; or pass --address "
        "HOST:PORT")
    with pytest.raises(RuntimeError, match=f"no stack is running in {tmp_path / 'none'}; start one with "
                                           "`memory3 up`"):
        stack_commands.decoder_address(tmp_path / "none", None)


def test_a_stack_whose_up_was_killed_before_its_services_is_not_up(tmp_path, sleepers, capsys):
    """An `up` killed while it trained (SIGKILL, the OOM killer) left the stores running and no service:
    `status` said every process was up (exit 0), `generate` ended in a KeyError traceback."""
    home = tmp_path / "home"
    state = save_state(home, ours("s3", sleepers()), ours("redis", sleepers(), port=2))
    state.planned = ["s3", "redis", "text", "memory", "decoder"]
    state.save(state_path(home))
    assert stack_commands.cmd_status(home, " --home h") == 1
    shown = capsys.readouterr().out
    assert "decoder           -  -                 not started -" in shown
    assert "the `memory3 up` that started it was stopped before it ended: `memory3 down --home h` then" in shown
    assert stack_is_up(home) is None
    with pytest.raises(RuntimeError) as failed:
        stack_commands.decoder_address(home, None, " --home h")
    assert str(failed.value) == (
        f"no decoder address: the local stack in {home} was left half-started (text, memory, decoder not running: "
        "the `memory3 up` that started it was stopped before it ended): `memory3 down --home h` then `memory3 up "
        "--home h` starts it again; or pass --address HOST:PORT")


def test_a_stack_being_started_is_said_to_be_so(tmp_path, sleepers, capsys):
    """While `up` trains, the services are not up yet, and `down` then `up` would be refused."""
    home = tmp_path / "home"
    state = save_state(home, ours("s3", sleepers()))
    state.planned = ["s3", "decoder"]
    state.save(state_path(home))
    with stack_lock(home):
        assert stack_commands.cmd_status(home) == 1
        assert capsys.readouterr().out.endswith(f"the stack is being started or stopped (by pid {os.getpid()})\n")
        with pytest.raises(RuntimeError, match=f"is being started or stopped \\(by pid {os.getpid()}; decoder not "
                                               "running\\): wait for that command to end"):
            stack_commands.decoder_address(home, None)


def test_release_commands_use_the_store_of_a_partly_down_stack_while_its_s3_runs(tmp_path, sleepers, capsys):
    home = tmp_path / "home"
    s3 = sleepers()
    save_state(home, ours("s3", s3), StackProcess("decoder", DEAD_PID, 2, "d.log"))
    assert s3_config(store_args(home), local_stack=True).endpoint == "127.0.0.1:9"
    s3.kill()
    s3.wait()
    with pytest.raises(ValueError) as failed:
        s3_config(store_args(home), local_stack=True)
    assert str(failed.value) == (f"no object store: the local stack in {home} has stopped: `memory3 up --home "
                                 f"{home}` starts it again; or pass --s3-endpoint HOST:PORT")


def test_the_bucket_from_the_environment_applies_to_the_local_stacks_store(tmp_path, sleepers, monkeypatch, capsys):
    home = tmp_path / "home"
    save_state(home, ours("s3", sleepers()))
    monkeypatch.delenv("MEMORY3_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("MEMORY3_S3_BUCKET", "other")
    assert s3_config(store_args(home), local_stack=True).bucket == "other"
    assert "(bucket 'other')" in capsys.readouterr().err
    assert s3_config(store_args(home, bucket="third"), local_stack=True).bucket == "third"  # the option first
    monkeypatch.delenv("MEMORY3_S3_BUCKET")
    assert s3_config(store_args(home), local_stack=True).bucket == "memory3"


# -- hints that can be followed as printed --

def test_a_missing_release_gets_a_hint_that_keeps_a_store_up_for_train(tmp_path, monkeypatch):
    """`up` stops the S3 server it started when it fails: `memory3 train` alone had no store to publish to."""
    monkeypatch.setattr("memory3.services.storage.object_store.ObjectStore",
                        lambda _config: SimpleNamespace(exists=lambda _key: False))
    monkeypatch.setattr("memory3.services.release.catalog.read_catalog",
                        lambda _store: SimpleNamespace(published=[]))
    with pytest.raises(ValueError) as failed:
        stack_commands.ensure_release(S3Config("127.0.0.1:9", "k"), "nosuch", home=tmp_path, quick=True, train=False,
                                      home_option=" --home h")
    assert str(failed.value).endswith(
        "to train this one, start the stack with the default release (`memory3 up --quick --home h`), then "
        "`memory3 train --release nosuch --quick --home h` trains and publishes it into the stack's store")


def test_a_work_dir_of_another_run_is_to_be_finished_or_removed_not_changed(tmp_path, monkeypatch):
    """`up` trains into HOME/runs/NAME, where a `memory3 train --release NAME` of other settings may have
    left a run; the trainer's message then told `up` to use a new --work-dir, which it does not take."""
    from memory3.services.trainer.pipeline import WorkDirTaken

    monkeypatch.setattr("memory3.services.storage.object_store.ObjectStore",
                        lambda _config: SimpleNamespace(exists=lambda _key: False))

    def taken(*_args, work_dir, **_kwargs):
        raise WorkDirTaken(work_dir, "preset 'small' there, 'tiny' now")

    monkeypatch.setattr("memory3.services.cli.commands.cmd_train", taken)
    with pytest.raises(ValueError) as failed:
        stack_commands.ensure_release(S3Config("127.0.0.1:9", "k"), "quick-v1", home=tmp_path, quick=True, train=True)
    runs = tmp_path / "runs" / "quick-v1"
    assert str(failed.value) == (
        f"{runs} holds a run of another configuration (preset 'small' there, 'tiny' now), left by a `memory3 train "
        f"--release quick-v1` of other settings: finish that run with its own command, or remove {runs} to train "
        "the stack's release from the start")


def test_hints_repeat_the_home_that_was_given(tmp_path, sleepers, monkeypatch, capsys):
    home = tmp_path / "my home"
    assert home_option(DEFAULT_HOME) == "" and home_option(home) == f" --home '{home}'"
    save_state(home, ours("s3", sleepers()), ours("decoder", sleepers()))
    with pytest.raises(RuntimeError, match=f"already running .*: run `memory3 down --home '{home}'` first"):
        start_stack(StackOptions(home=home, release="r", home_option=home_option(home)))

    monkeypatch.setattr(stack_commands, "start_stack", lambda _options, **_kw: stack_is_up(home))
    assert main(["up", "--home", str(home)]) == 0
    assert (f"`memory3 generate \"...\" --home '{home}'` to ask, `memory3 down --home '{home}'` to stop"
            in capsys.readouterr().err)
    assert main(["status", "--home", str(tmp_path / "none")]) == 1
    assert f"(`memory3 up --home {tmp_path / 'none'}` starts one)" in capsys.readouterr().out


def test_an_interrupted_demo_says_the_stack_it_found_keeps_running(tmp_path, sleepers, monkeypatch, capsys):
    """With the stack already up, the demo started nothing: "what it had started is stopped" was wrong."""
    home = tmp_path / "home"
    save_state(home, ours("s3", sleepers()), ours("decoder", sleepers()))

    def interrupted(*_args):
        raise KeyboardInterrupt
    monkeypatch.setattr(stack_commands, "heldout_questions", interrupted)
    assert main(["demo", "--home", str(home)]) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == (f"memory3 demo: interrupted (SIGINT); the stack keeps running "
                                               f"(`memory3 down --home {home}` stops it)")


# -- a state file that cannot be read --

@pytest.mark.parametrize("text", [
    '{"home": "x", "rel',  # cut short
    "{}",  # not a state
    '{"home": "x", "release": "r", "s3": {}, "redis_url": null, "processes": [{"name": "s3", "pid": 7, '
    '"port": 1, "log": "l", "pidfd": 3}]}',  # written by another version
    '{"home": "x", "release": "r", "s3": {}, "redis_url": null, "processes": [{"name": "s3", "pid": "7", '
    '"port": 1, "log": "l"}]}',
])
@pytest.mark.parametrize("command", [["status"], ["down"], ["up"], ["generate", "hi"], ["demo"], ["release", "list"]])
def test_a_state_file_that_cannot_be_read_is_one_line_that_says_what_to_do(tmp_path, capsys, monkeypatch, text,
                                                                           command):
    monkeypatch.delenv("MEMORY3_S3_ENDPOINT", raising=False)
    home = tmp_path / "home"
    state_path(home).parent.mkdir(parents=True)
    state_path(home).write_text(text)
    assert main([*command, "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"error: the stack state {state_path(home)} cannot be read (" in err
    assert err.rstrip().endswith("if they still run, then remove the file")
    if '"pid": 7' in text:
        assert "stop the processes it lists (pids 7)" in err


def test_a_stack_on_a_store_of_its_callers_gives_its_services_all_of_it(tmp_path):
    """A store given to the stack (tests, benchmarks) reached its services as endpoint and bucket alone, and
    one with a CA bundle could not even be saved in the state file."""
    from memory3.services.stack import StackOptions, StackState, _service_args

    bundle = tmp_path / "ca.pem"
    store = S3Config("s3.example.com:443", "k", "s", bucket="b", secure=True, region="eu-west-3", ca_bundle=bundle)
    state = StackState(str(tmp_path), "r", {}, None)
    state.keep_store(store)
    state.save(tmp_path / "state.json")
    loaded = StackState.load(tmp_path / "state.json")
    assert loaded.s3_config == store
    args = _service_args("memory", StackOptions(home=tmp_path, release="r", s3=store), loaded, 50051)
    assert args[args.index("--s3-region") + 1] == "eu-west-3" and "--s3-secure" in args
    assert args[args.index("--s3-ca-bundle") + 1] == str(bundle)
