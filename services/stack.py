"""The whole system on one machine: `memory3 up` / `memory3 down`.

Starts a real S3 server (`rclone serve s3`) and a real `redis-server` on 127.0.0.1, makes sure
the release exists (training and publishing the small one when the bucket has none), then the
text, memory and decoder services as separate processes, each waited for until its health check
says SERVING. Every process's PID, port and log file go into a state file, so `down` stops
exactly what `up` started, by PID, and `generate` finds the decoder. A PID is recorded with its
process's start time: PIDs are reused (after a reboot, in a container), and a process that merely
has a recorded PID is never signalled nor reported as the stack's. A lock on the stack directory
lets one `up` or `down` at a time act on a home.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .release.manifest import check_release_name
from .storage.local_redis import start_local_redis
from .storage.local_s3 import free_port, listens, port_taken, start_local_s3
from .storage.object_store import S3Config, s3_arguments

STATE_FILE = "state.json"
LOCK_FILE = "lock"
SERVICES = ("text", "memory", "decoder")


@dataclass
class StackProcess:
    name: str
    pid: int
    port: int
    log: str
    metrics_port: int | None = None
    log_start: int = 0  # bytes its log (appended to, run after run) held before this run: `_tail` shows the rest
    # When the process started (/proc/PID/stat field 22), read right after spawning; None: unknown (a state
    # file from before it was recorded, or no /proc), and then any live process with the PID counts.
    started: int | None = None

    def running(self) -> bool:
        """Whether this process still runs: its PID is alive and, when its start time is known, the
        process with that PID is the same one (not another that was given the PID since)."""
        if not _alive(self.pid):
            return False
        return self.started is None or process_start_time(self.pid) == self.started

    def adopt(self, pid: int) -> None:
        """It was started again as `pid` (a restart in a fault test): recorded with its start time,
        or `down` would take the new process for one that reused the PID, and leave it running."""
        self.pid, self.started = pid, process_start_time(pid)

    def reused(self) -> bool:
        """Its PID is alive but belongs to another process now."""
        return _alive(self.pid) and not self.running()


@dataclass
class StackState:
    home: str
    release: str
    s3: dict  # S3Config fields (the local server's generated credentials: the file is 0600)
    redis_url: str | None
    processes: list[StackProcess] = field(default_factory=list)
    # Every process `up` meant to start, saved before the first: an `up` killed on the way (SIGKILL, the
    # machine's OOM killer) leaves a state whose stores run and whose services never started.
    planned: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        """The stack's processes, started or only planned."""
        started = [p.name for p in self.processes]
        return started + [n for n in self.planned if n not in started]

    def not_started(self) -> list[str]:
        return [n for n in self.planned if n not in {p.name for p in self.processes}]

    def not_running(self, names: tuple[str, ...] | None = None) -> list[str]:
        """The processes (of `names`, default all) that do not run any more, or never started."""
        stopped = [p.name for p in self.processes if not p.running()]
        return [n for n in stopped + self.not_started() if names is None or n in names]

    def process(self, name: str) -> StackProcess:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(f"the stack has no {name!r} process")

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.process(name).port}"

    def metric(self, name: str, series: str, labels: str = "") -> float:
        """One sample of process `name`'s /metrics, e.g. ("memory", "memory3_memory_hits_total",
        '{tier="redis"}'); 0 when the series is absent."""
        port = self.process(name).metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        found = re.search(rf"^{re.escape(series)}{re.escape(labels)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    @property
    def s3_config(self) -> S3Config:
        bundle = self.s3.get("ca_bundle")
        return S3Config(**{**self.s3, "ca_bundle": Path(bundle) if bundle else None})

    def keep_store(self, s3: S3Config) -> None:
        """Keep `s3` in the state, as JSON holds it (the CA bundle's path as text)."""
        self.s3 = {**asdict(s3), "ca_bundle": str(s3.ca_bundle) if s3.ca_bundle else None}

    def save(self, path: Path) -> None:
        """Written whole or not at all, readable by its owner alone from the start (it holds the
        store's secret key, and a Redis URL with its password when there is one)."""
        _private_dir(path.parent)
        _write_private(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> StackState:
        """The state in `path`; a file that is not one (cut short, or written by another version of
        memory3) is a one-line error that says how to get past it, not a traceback."""
        text = path.read_text()
        try:
            data = json.loads(text)
            data["processes"] = [StackProcess(**p) for p in data["processes"]]
            state = cls(**data)
            _check_types(state)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            pids = re.findall(r'"pid":\s*(\d+)', text)
            listed = f"the processes it lists (pids {', '.join(pids)})" if pids else "any processes it lists"
            raise ValueError(f"the stack state {path} cannot be read ({type(e).__name__}: {e}): stop {listed} "
                             f"if they still run, then remove the file") from None
        return state


@dataclass(frozen=True)
class StackOptions:
    home: Path
    release: str
    redis: bool = True
    retrieval_policy: str = "fail"
    max_batch: int = 8
    ready_timeout_s: float = 180.0
    decoder_port: int | None = None  # None: a free port
    extra_args: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per service, e.g. {"memory": (...)}
    s3: S3Config | None = None  # an existing object store; None starts a local one (rclone) under home
    # CPU cores per service (Linux), e.g. {"decoder": {0}, "text": {1}}: emulates separate nodes on one machine.
    cpu_affinity: dict[str, set[int]] = field(default_factory=dict)
    redis_password: str | None = None  # the local Redis requires it (passed to services in their env only)
    text_shards: int = 1  # text services, each with one shard of the release's index (`--index-shard I/N`)
    home_option: str = ""  # the `--home` the user gave, repeated in hints (empty for the default home)

    def __post_init__(self) -> None:
        """What a service would refuse only once the stores and the services before it started."""
        check_release_name(self.release)
        if not 1 <= self.text_shards <= 64:
            raise ValueError(f"--text-shards must be between 1 and 64, got {self.text_shards}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be 1 or more, got {self.max_batch}")
        if self.decoder_port is not None and not 0 <= self.decoder_port <= 65535:
            raise ValueError(f"--decoder-port {self.decoder_port} is not a port: give 0-65535 (0: any free port)")

    def text_names(self) -> list[str]:
        """The text services' process names: "text", or "text-<i>" for each index shard."""
        return ["text"] if self.text_shards == 1 else [f"text-{i}" for i in range(self.text_shards)]


def _check_types(state: StackState) -> None:
    """What the code after `load` relies on: names, PIDs and ports that are what they say."""
    for p in state.processes:
        if not (isinstance(p.name, str) and isinstance(p.pid, int) and isinstance(p.port, int)
                and (p.started is None or isinstance(p.started, int))):
            raise TypeError(f"process entry {asdict(p)} has a field of the wrong type")
    if not isinstance(state.s3, dict):
        raise TypeError("s3 is not an object")
    if not (isinstance(state.planned, list) and all(isinstance(n, str) for n in state.planned)):
        raise TypeError("planned is not a list of names")


def state_path(home: Path) -> Path:
    return home / "stack" / STATE_FILE


def read_state(home: Path) -> StackState | None:
    """The state of the stack last started in `home`, running or not; None when there is none."""
    path = state_path(home)
    return StackState.load(path) if path.exists() else None


def stack_is_up(home: Path) -> StackState | None:
    state = read_state(home)
    return state if state is not None and not state.not_running() else None


def down_message(state: StackState, home_option: str = "") -> str:
    """What is wrong with a stack some or all of whose processes stopped, and the commands that get
    past it (`home_option`: the `--home` the user gave, to repeat; empty for the default home)."""
    down = state.not_running()
    holder = lock_holder(Path(state.home))
    if holder is not None:
        return (f"the local stack in {state.home} is being started or stopped (by {holder}; "
                f"{', '.join(down)} not running): wait for that command to end")
    if len(down) == len(state.names()):
        return f"the local stack in {state.home} has stopped: `memory3 up{home_option}` starts it again"
    if state.not_started():
        return (f"the local stack in {state.home} was left half-started ({', '.join(down)} not running: the "
                f"`memory3 up` that started it was stopped before it ended): `memory3 down{home_option}` then "
                f"`memory3 up{home_option}` starts it again")
    return (f"the local stack in {state.home} is partly down ({', '.join(down)} not running): "
            f"`memory3 status{home_option}` shows it; `memory3 down{home_option}` then `memory3 up{home_option}` "
            "starts it again")


@contextlib.contextmanager
def stack_lock(home: Path) -> Iterator[None]:
    """One `up` or `down` at a time in a home: two at once each started a stack, and the state
    file kept only the second's, so `down` never stopped the first. Not waited for: the other one
    may be training for half an hour. The lock goes with the process, however it ends."""
    path = home / "stack" / LOCK_FILE
    _private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by the processes started under it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise RuntimeError(f"another memory3 command ({who}) is starting or stopping the stack in {home}: "
                               "wait for it to end (or stop it), then run this again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_holder(home: Path) -> str | None:
    """Who holds `home`'s lock now ("pid N"), an `up` or `down` acting on it; None when none does: a
    stack that one is starting is not down, and the hints for a stack that is would be wrong. Read
    from /proc/locks: taking the lock to probe it, even shared and for a moment, would refuse an `up`
    started at that moment."""
    try:
        st = os.stat(home / "stack" / LOCK_FILE)
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
            return f"pid {fields[4]}"
    return None


def start_stack(options: StackOptions, *, ensure_release: Callable[[S3Config, str], None] | None = None,
                log: Callable[[str], None] = print) -> StackState:
    """Start everything; on any failure stop what was started and raise with the failing log's tail."""
    with stack_lock(options.home):
        return _start_stack(options, ensure_release, log)


def _start_stack(options: StackOptions, ensure_release: Callable[[S3Config, str], None] | None,
                 log: Callable[[str], None]) -> StackState:
    home = options.home
    previous = read_state(home)
    if previous is not None:
        down = previous.not_running()
        if not down:
            raise RuntimeError(f"a stack is already running (state in {state_path(home)}): "
                               f"run `memory3 down{options.home_option}` first")
        log(f"the last stack is partly down ({', '.join(down)} not running): stopping the rest")
        stop_processes(previous.processes, log)
        state_path(home).unlink(missing_ok=True)
    _check_decoder_port(options)
    run_dir = home / "stack"
    path = state_path(home)
    state = StackState(str(home), options.release, {}, None, planned=_planned(options))
    try:
        # Each store is saved in the state as soon as it runs: an `up` killed later (SIGKILL, the OOM
        # killer) leaves processes that `down` finds.
        if options.s3 is None:
            local = start_local_s3(run_dir / "s3-data", port=free_port(_ports_given(options, state)),
                                   log_file=run_dir / "s3.log", secret_key=_secret(run_dir))
            state.processes.append(StackProcess("s3", local.pid, int(local.config.endpoint.rsplit(":", 1)[1]),
                                                str(run_dir / "s3.log"), started=process_start_time(local.pid)))
            s3 = local.config
            state.keep_store(s3)
            state.save(path)
            log(f"S3 server (rclone) on {s3.endpoint}, data in {run_dir / 's3-data'}")
        else:
            s3 = options.s3
            state.keep_store(s3)
        from .storage.object_store import ObjectStore
        ObjectStore(s3).ensure_bucket()
        if options.redis:
            redis = start_local_redis(run_dir / "redis", port=free_port(_ports_given(options, state)),
                                      maxmemory="256mb", password=options.redis_password)
            state.redis_url = redis.url
            state.processes.append(StackProcess("redis", redis.pid, redis.port, str(run_dir / "redis" / "redis.log"),
                                                started=process_start_time(redis.pid)))
            log(f"Redis on {redis.url.split('@')[-1]}")
        state.save(path)
        if ensure_release is not None:
            ensure_release(s3, options.release)
        services = [*options.text_names(), "memory", "decoder"]
        for label in services:
            name = "text" if label.startswith("text") else label
            port = options.decoder_port if (name == "decoder" and options.decoder_port) else None
            if port:  # free when `up` began, which may be half an hour of training ago
                _check_decoder_port(options, again=True)
            started = spawn_service(options, state, name, port=port, label=label)
            state.processes.append(started)
            state.save(path)
            log(f"{label} service starting on 127.0.0.1:{started.port} (log {started.log})")
        for p in state.processes:
            if p.name in services:
                wait_serving(p, options.ready_timeout_s)
                log(f"{p.name} service SERVING")
    except BaseException:
        _stop_after_failure(state.processes, log, options.home_option)  # a second interrupt goes on from here
        path.unlink(missing_ok=True)
        raise
    return state


def _check_decoder_port(options: StackOptions, *, again: bool = False) -> None:
    """`--decoder-port`, refused in `up`'s words while another server listens on it: the decoder's own
    refusal names its `--port`, an option `up` does not have."""
    port = options.decoder_port
    if port and port_taken("127.0.0.1", port):
        now = " now (it was free when `up` began)" if again else ""
        raise RuntimeError(f"--decoder-port {port}: another server listens on 127.0.0.1:{port}{now}; choose another "
                           "port, or leave the option out for a free one")


def _ports_given(options: StackOptions, state: StackState) -> set[int]:
    """The ports handed out to the stack's processes so far, and `--decoder-port`: a server binds its
    port only once it has started (seconds, for a service), so until then the port is free still,
    and only this set keeps it from being handed out twice."""
    ports = {options.decoder_port} if options.decoder_port else set()
    for p in state.processes:
        ports |= {p.port} | ({p.metrics_port} if p.metrics_port else set())
    return ports


def _stop_after_failure(processes: list[StackProcess], log: Callable[[str], None], home_option: str) -> None:
    """Stop what a failed or interrupted `up` started, saying so, as `down` would (services drain, so
    this can take a while). A second Ctrl-C or SIGTERM on the way cuts the waiting, not the stopping:
    every process still running is sent SIGTERM, and that interrupt then goes on, saying what may run
    still and how to stop it (the state file is kept for `down`)."""
    running = [p for p in reversed(processes) if p.running()]
    if not running:
        return
    log("stopping what it started: " + ", ".join(f"{p.name} (pid {p.pid})" for p in running))
    try:
        stop_processes(processes, log)
    except KeyboardInterrupt as e:
        pending = [p for p in processes if p.running()]
        signalled = [p.name for p in reversed(pending)]
        while pending:  # a third interrupt only starts this again: the SIGTERMs all go out
            with contextlib.suppress(KeyboardInterrupt):
                while pending:
                    with contextlib.suppress(ProcessLookupError):
                        if pending[-1].running():
                            os.kill(pending[-1].pid, signal.SIGTERM)
                    pending.pop()
        e.left = (f"it was interrupted while stopping what it had started: {', '.join(signalled)} sent SIGTERM, "
                  f"not waited for; `memory3 status{home_option}` shows what still runs, `memory3 down{home_option}` "
                  "stops it")
        raise


def _planned(options: StackOptions) -> list[str]:
    """The processes `_start_stack` starts, in its order."""
    stores = (["s3"] if options.s3 is None else []) + (["redis"] if options.redis else [])
    return [*stores, *options.text_names(), "memory", "decoder"]


def spawn_service(options: StackOptions, state: StackState, name: str, *, port: int | None = None,
                  label: str | None = None) -> StackProcess:
    """Start one service process against the stack's stores; not waited for (see `wait_serving`).

    Also restarts a service that was stopped (pass its port), or adds another with other options
    (e.g. a second decoder with another retrieval policy, under its own `label` and log file).
    """
    given = _ports_given(options, state)
    port = port or free_port(given)
    metrics_port = free_port(given | {port})
    args = [*_service_args(name, options, state, port), "--metrics-port", str(metrics_port)]
    if name == "text" and label in options.text_names() and options.text_shards > 1:
        args += ["--index-shard", f"{options.text_names().index(label)}/{options.text_shards}"]
    logfile = Path(state.home) / "stack" / f"{label or name}.log"
    with open(logfile, "ab") as out:
        log_start = os.fstat(out.fileno()).st_size
        process = subprocess.Popen([sys.executable, "-m", "memory3.services.cli.main", *args],
                                   stdout=out, stderr=out, env=_service_env(state.s3_config, state.redis_url),
                                   start_new_session=True)
    try:
        started = process_start_time(process.pid)
        if name in options.cpu_affinity:  # before torch starts its thread pools
            os.sched_setaffinity(process.pid, options.cpu_affinity[name])
    except BaseException:  # not recorded yet, so no `down` would ever stop it
        process.kill()
        process.wait()
        raise
    return StackProcess(label or name, process.pid, port, str(logfile), metrics_port, log_start, started)


def stop_stack(home: Path, log: Callable[[str], None] = print) -> bool:
    path = state_path(home)
    if not path.parent.is_dir():  # nothing was started here: no lock (nor directory) to create
        log("no stack is running (no state file)")
        return False
    with stack_lock(home):
        state = read_state(home)
        if state is None:
            log("no stack is running (no state file)")
            return False
        stop_processes(state.processes, log)
        path.unlink(missing_ok=True)
    return True


def stop_processes(processes: list[StackProcess], log: Callable[[str], None] = lambda _m: None) -> None:
    """Services first (they drain), then the stores; each by PID: SIGTERM, then SIGKILL. A PID
    that another process has now is left alone."""
    for p in reversed(processes):
        if p.running():
            _terminate(p)
            log(f"stopped {p.name} (pid {p.pid})")
        elif p.reused():
            log(f"{p.name} had exited (pid {p.pid} is another process's now: left alone)")


def process_state(process: StackProcess) -> str:
    """"exited", or for a gRPC service its health ("SERVING", "NOT_SERVING", "no answer"), else "running"."""
    if not process.running():
        return "exited"
    if process.name in ("s3", "redis"):
        return "running"
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError:
            return "no answer"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(process: StackProcess, timeout_s: float) -> None:
    """Until `process` reports SERVING on its port. An answer there from a server of another process
    (the port taken since it was chosen) does not count: the stack would use that one in its place."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    taken = ""
    with grpc.insecure_channel(f"127.0.0.1:{process.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not process.running():
                raise RuntimeError(f"the {process.name} service exited during startup{taken}; its log ends with:\n"
                                   + _tail(Path(process.log), start=process.log_start))
            try:
                serving = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == \
                    health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                serving = False
            if serving:
                if listens(process.pid, process.port) is not False:
                    return
                taken = f" (another process answered on 127.0.0.1:{process.port}: the port was taken)"
            time.sleep(0.3)
    raise RuntimeError(f"the {process.name} service was not SERVING within {timeout_s:.0f}s{taken}; its log ends "
                       "with:\n" + _tail(Path(process.log), start=process.log_start))


def _service_args(name: str, options: StackOptions, state: StackState, port: int) -> list[str]:
    s3 = state.s3_config
    common = ["serve", name, "--release", options.release, "--host", "127.0.0.1", "--port", str(port),
              *s3_arguments(s3), "--cache-dir", str(Path(state.home) / "releases" / name)]
    if name == "decoder":
        text = ",".join(state.address(t) for t in options.text_names())
        return [*common, "--text-address", text, "--memory-address", state.address("memory"),
                "--retrieval-policy", options.retrieval_policy, "--max-batch", str(options.max_batch),
                *options.extra_args.get(name, ())]
    return [*common, *options.extra_args.get(name, ())]


def _service_env(s3: S3Config, redis_url: str | None) -> dict[str, str]:
    """A service's environment: the caller's without any MEMORY3_* setting, then the stack's own. A
    shell set up for a remote deployment has its token, CA bundle or Redis URL there, which would
    otherwise reach the local services (a token they would demand, a Redis they would fill)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY3_")}
    env.update({"MEMORY3_S3_ACCESS_KEY": s3.access_key, "MEMORY3_S3_SECRET_KEY": s3.secret_key})
    if redis_url:
        env["MEMORY3_REDIS_URL"] = redis_url
    return env


def _secret(run_dir: Path) -> str:
    """The local S3 server's secret, kept across runs so its data stays readable."""
    path = run_dir / "s3-secret"
    if not path.exists():
        import secrets

        _private_dir(run_dir)
        _write_private(path, secrets.token_hex(16))
    return path.read_text().strip()


def _private_dir(path: Path) -> None:
    """The stack's directory, its owner's alone (0700): its state, secret, logs and the bucket's data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_mode & 0o077:  # made by an earlier version, with the umask's mode
        path.chmod(0o700)


def _write_private(path: Path, text: str) -> None:
    """`text` into `path`, by a temporary file created 0600 (never readable by others, not even until
    a chmod) renamed over it: a crash leaves the old file or the new one, not a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # one a crash left may have another mode, which O_CREAT would keep
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
    tmp.replace(path)


def process_start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/PID/stat field 22): with the PID,
    what tells that process from a later one given the same PID; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return int(fields[19])  # field 3 (the state) is fields[0]
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _terminate(process: StackProcess, timeout_s: float = 15.0) -> None:
    pid = process.pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.running():
            _reap(pid)
            return
        time.sleep(0.1)
    if process.running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap(pid, wait_s=2.0)


def _reap(pid: int, wait_s: float = 0.0) -> None:
    """Collect the exit status of `pid` when it is our child (`up` cleaning up), or it stays a zombie
    until we exit; waiting up to `wait_s` for it to end (a SIGKILL takes a moment to)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (`down`), or collected already
            return
        if done or time.monotonic() >= deadline:
            return
        time.sleep(0.01)


def _tail(path: Path, lines: int = 25, *, start: int = 0) -> str:
    """The last `lines` lines of a log from byte `start` on: what this run wrote, not earlier runs."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or "(nothing in its log)"
