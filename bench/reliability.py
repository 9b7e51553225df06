"""Reliability benchmark: load, overload and injected faults against a private stack, as a client.

`ReliabilityStack` starts the whole system on 127.0.0.1 in a temporary directory, arranged so
that faults can be injected: the S3 server (rclone) behind a `DelayProxy`, a password-protected
Redis, the memory service without its RAM tier and the decoders without their cache of decoded
memories (every fetch reaches Redis or S3), and a second
decoder with the "continue" retrieval policy (and a per-client stream limit) beside the default
"fail" one. Then, each bounded in time and count:

  - load: closed-loop clients (as many as batch rows) for a few seconds: throughput, TTFT/ITL
    percentiles, outcomes by status code;
  - overload: twice the decoder's capacity (batch rows + queue); the excess must get
    RESOURCE_EXHAUSTED at once (its latency is measured), never a timeout; run twice, with the
    decoder's RSS read after each run (flat: no leak), and the running/waiting gauges back to 0;
  - faults, each counted as injected and survived: Redis killed and restarted under load; S3
    killed and restarted; slow S3; a corrupt blob; the text service killed and restarted (per
    policy); random bad inputs to every RPC; a per-client stream limit; decoder SIGTERM under load.

`data_lost` counts streams that ended with neither a finish reason nor an error, and memories
of the bank that no longer come back intact. `crashes` counts service processes that died
without being killed on purpose. The fault functions are reused by tests/integration/test_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import secrets
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from memory3.services.stack import (
    StackOptions,
    StackProcess,
    StackState,
    spawn_service,
    start_stack,
    stop_processes,
    wait_serving,
)
from memory3.services.storage.local_redis import start_local_redis
from memory3.services.storage.local_s3 import LocalS3, start_local_s3
from memory3.services.storage.object_store import ObjectStore

from .fault_proxy import DelayProxy

RELEASE = "bench-reliability"
SERVICES = ("text", "memory", "decoder", "decoder-continue")
# What any RPC of ours may answer; anything else (INTERNAL, UNKNOWN) is a bug.
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
              "DATA_LOSS"}


# ---- outcomes ----------------------------------------------------------------------------------
@dataclass
class Outcomes:
    """What clients saw: one code per request ("OK": ended with a finish reason; "LOST": neither)."""

    codes: Counter = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    exhausted_latency: list[float] = field(default_factory=list)  # RESOURCE_EXHAUSTED answers
    error_latency: list[float] = field(default_factory=list)  # every other error
    tokens: int = 0
    warned: int = 0  # finished streams whose response carried a warning
    details: list[str] = field(default_factory=list)  # first messages of unexpected errors
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        return self.codes["LOST"]

    def summary(self) -> dict:
        return {"requests": sum(self.codes.values()), "by_code": dict(sorted(self.codes.items())),
                "tokens": self.tokens, "tok_s": round(self.tokens / self.seconds, 2) if self.seconds else None,
                "ttft": percentiles(self.ttft), "itl": percentiles(self.itl),
                "resource_exhausted_latency": percentiles(self.exhausted_latency),
                "error_latency": percentiles(self.error_latency), "warned": self.warned, "lost": self.lost}


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    xs = sorted(xs)
    return {"p50_ms": round(1000 * xs[len(xs) // 2], 3),
            "p99_ms": round(1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 3), "n": len(xs)}


async def generate_once(stub, prompt: str, out: Outcomes, *, new_tokens: int, memory: bool = True,
                        timeout_s: float = 60.0, metadata=None) -> str:
    """One streamed request, recorded in `out`; returns its code."""
    from memory3.v1 import generation_service_pb2 as pb

    mode = pb.RETRIEVAL_MODE_MEMORY if memory else pb.RETRIEVAL_MODE_NONE
    request = pb.GenerateRequest(prompt=prompt, params=pb.GenerationParams(max_tokens=new_tokens, retrieval=mode,
                                                                           ignore_eos=True))
    start = last = time.perf_counter()
    finished, warned, first = False, False, True
    try:
        async for response in stub.Generate(request, timeout=timeout_s, metadata=metadata):
            now, n = time.perf_counter(), len(response.token_ids)
            warned = warned or bool(response.warnings)
            if n:
                if first:
                    out.ttft.append(now - start)
                    first = False
                else:
                    out.itl.extend([(now - last) / n] * n)
                last = now
                out.tokens += n
            finished = finished or response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    except grpc.aio.AioRpcError as e:
        code = e.code().name
        (out.exhausted_latency if code == "RESOURCE_EXHAUSTED" else out.error_latency).append(
            time.perf_counter() - start)
        if code not in ("RESOURCE_EXHAUSTED",) and len(out.details) < 5:
            out.details.append(f"{code}: {e.details()}"[:300])
        out.codes[code] += 1
        return code
    code = "OK" if finished else "LOST"
    out.codes[code] += 1
    out.warned += warned and finished
    return code


async def closed_loop(address: str, prompts: list[str], *, clients: int, seconds: float, new_tokens: int,
                      memory: bool = True, backoff_s: float = 0.05, timeout_s: float = 60.0) -> Outcomes:
    """`clients` send requests back to back for `seconds` (a request in flight is finished, not cut)."""
    from memory3.v1 import generation_service_pb2_grpc as pb_grpc

    out = Outcomes()
    deadline = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_concurrent_streams", 1000)]) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def client(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                code = await generate_once(stub, prompts[k % len(prompts)], out, new_tokens=new_tokens,
                                           memory=memory, timeout_s=timeout_s)
                k += clients
                if code != "OK":
                    await asyncio.sleep(backoff_s)

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        out.seconds = time.perf_counter() - start
    return out


async def burst(address: str, prompts: list[str], *, new_tokens: int, memory: bool = True, timeout_s: float = 60.0,
                metadata=None) -> Outcomes:
    """One request per prompt, all at once."""
    from memory3.v1 import generation_service_pb2_grpc as pb_grpc

    out = Outcomes()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        start = time.perf_counter()
        await asyncio.gather(*(generate_once(stub, p, out, new_tokens=new_tokens, memory=memory,
                                             timeout_s=timeout_s, metadata=metadata) for p in prompts))
        out.seconds = time.perf_counter() - start
    return out


# ---- the stack ---------------------------------------------------------------------------------
def documents(n: int, seed: int) -> list[tuple[str, str]]:
    from memory3.services.trainer.world import World

    world = World(seed, n_train=n, n_heldout=1)
    return [(e.id, e.document) for e in world.entities[:n]]


class ReliabilityStack:
    """A private stack on 127.0.0.1 built for fault injection (see the module's docstring)."""

    def __init__(self, home: Path, *, preset: str = "tiny", max_batch: int = 4, max_waiting: int = 4,
                 n_documents: int = 48, seed: int = 0, max_streams_per_client: int = 2, log=print) -> None:
        self.home, self.preset, self.seed, self.log = home, preset, seed, log
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.max_streams_per_client = max_streams_per_client
        self.docs = documents(n_documents, seed)
        rng = random.Random(seed)
        # Prompts of two 64-token chunks: each retrieves (and fetches) memories for both.
        self.prompts = [" ".join(rng.choice(self.docs)[1] for _ in range(3))[:120] for _ in range(64)]
        self.redis_password = secrets.token_hex(12)
        self.s3: LocalS3 | None = None
        self.proxy: DelayProxy | None = None
        self.state: StackState | None = None
        self.options: StackOptions | None = None
        self.manifest = None
        self.killed: set[str] = set()  # processes stopped on purpose (not crashes)

    # -- lifecycle --
    def start(self) -> ReliabilityStack:
        from memory3.services.release.synthetic import publish_random_release

        self.home.mkdir(parents=True, exist_ok=True)
        self.s3 = start_local_s3(self.home / "s3-data", log_file=self.home / "s3.log")
        try:
            store = ObjectStore(self.s3.config)
            store.ensure_bucket()
            self.manifest = publish_random_release(store, RELEASE, self.docs, preset=self.preset, seed=self.seed)
            self.proxy = DelayProxy("127.0.0.1", int(self.s3.config.endpoint.rsplit(":", 1)[1])).start()
            self.options = StackOptions(
                home=self.home / "home", release=RELEASE, s3=dataclasses.replace(self.s3.config,
                                                                                  endpoint=self.proxy.endpoint),
                max_batch=self.max_batch, redis_password=self.redis_password,
                extra_args={"memory": ("--ram-cache-mb", "0"),
                            "decoder": ("--max-waiting", str(self.max_waiting), "--max-seq-len", "512",
                                        "--grace", "20", "--memory-cache-mb", "0")})
            self.state = start_stack(self.options, log=self.log)
            extra = dataclasses.replace(self.options, retrieval_policy="continue", extra_args={
                **self.options.extra_args, "decoder": (*self.options.extra_args["decoder"],
                                                       "--max-streams-per-client", str(self.max_streams_per_client))})
            second = spawn_service(extra, self.state, "decoder", label="decoder-continue")
            self.state.processes.append(second)
            wait_serving(second, 180)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.state is not None:
            stop_processes(self.state.processes)
            self.state = None
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.s3 is not None:
            self.s3.stop()

    def __enter__(self) -> ReliabilityStack:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()

    # -- what tests and faults need --
    @property
    def store(self) -> ObjectStore:
        """The bucket, straight (not through the proxy)."""
        return ObjectStore(self.s3.config)

    def address(self, name: str) -> str:
        return self.state.address(name)

    def process(self, name: str) -> StackProcess:
        return self.state.process(name)

    def alive(self, name: str) -> bool:
        from memory3.services.stack import _alive

        return _alive(self.process(name).pid)

    def crashed(self) -> list[str]:
        return [n for n in SERVICES if n not in self.killed and not self.alive(n)]

    def metric(self, service: str, name: str, labels: str = "") -> float:
        return self.state.metric(service, name, labels)

    def gauges_return_to_zero(self, service: str = "decoder", timeout_s: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (self.metric(service, "memory3_num_requests_running"),
                    self.metric(service, "memory3_num_requests_waiting")) == (0, 0):
                return True
            time.sleep(0.2)
        return False

    def rss_mb(self, name: str = "decoder") -> float:
        with open(f"/proc/{self.process(name).pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return round(kb / 1024, 1)

    def flush_redis(self) -> None:
        import redis

        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(self.state.redis_url, socket_timeout=2).flushall()

    def memory_key(self, reference_id: str) -> str:
        from memory3.services.release.manifest import memory_key

        return memory_key(self.manifest.memory_bank["bank"], reference_id)

    def reference_ids(self) -> list[str]:
        import json

        from memory3.services.release.manifest import release_key
        from memory3.services.release.publish import REFERENCES_FILE

        text = self.store.get_bytes(release_key(RELEASE, REFERENCES_FILE)).decode()
        return [json.loads(line)["id"] for line in text.split("\n") if line.strip()]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.killed.add(name)
        os.kill(self.process(name).pid, sig)
        _wait_exit(self.process(name).pid)

    def restart_redis(self) -> None:
        p = self.process("redis")
        p.adopt(start_local_redis(Path(self.state.home) / "stack" / "redis", port=p.port, maxmemory="256mb",
                                  password=self.redis_password).pid)
        self.killed.discard("redis")

    def restart_s3(self) -> None:
        old = self.s3
        self.s3 = start_local_s3(old.data_dir, port=int(old.config.endpoint.rsplit(":", 1)[1]),
                                 bucket=old.config.bucket, access_key=old.config.access_key,
                                 secret_key=old.config.secret_key, log_file=self.home / "s3.log")

    def restart_service(self, name: str) -> None:
        old = self.process(name)
        fresh = spawn_service(self.options, self.state, name, port=old.port)
        self.state.processes[self.state.processes.index(old)] = fresh
        wait_serving(fresh, 180)
        self.killed.discard(name)

    def secrets_in_logs(self) -> list[str]:
        """Log files that contain the S3 secret key or the Redis password (there should be none)."""
        logs = [Path(p.log) for p in self.state.processes] + [self.home / "s3.log"]
        found = []
        for path in logs:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if self.s3.config.secret_key in text or self.redis_password in text:
                    found.append(str(path))
        return found


def _wait_exit(pid: int, timeout_s: float = 30.0) -> int | None:
    """Reap our child `pid`; its exit status (None if it did not exit in time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0 if not _exists(pid) else None
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run(coro):
    return asyncio.run(coro)


# ---- load ----------------------------------------------------------------------------------------
def load(rs: ReliabilityStack, *, seconds: float, new_tokens: int) -> dict:
    """Nominal load: as many closed-loop clients as batch rows."""
    out = _run(closed_loop(rs.address("decoder"), rs.prompts, clients=rs.max_batch, seconds=seconds,
                           new_tokens=new_tokens))
    return {"clients": rs.max_batch, "seconds": seconds, **out.summary(), "details": out.details,
            "gauges_return_to_zero": rs.gauges_return_to_zero()}


def overload(rs: ReliabilityStack, *, seconds: float, new_tokens: int, runs: int = 2) -> dict:
    """Twice the capacity, `runs` times; the decoder's RSS after each run."""
    clients = 2 * (rs.max_batch + rs.max_waiting)
    results, rss = [], []
    for _ in range(runs):
        out = _run(closed_loop(rs.address("decoder"), rs.prompts, clients=clients, seconds=seconds,
                               new_tokens=new_tokens))
        zero = rs.gauges_return_to_zero()
        rss.append(rs.rss_mb())
        results.append((out, zero))
    last, _ = results[-1]
    growth = rss[-1] - rss[0]
    return {"clients": clients, "capacity": rs.max_batch + rs.max_waiting, "seconds": seconds, **last.summary(),
            "details": last.details, "gauges_return_to_zero": all(z for _, z in results),
            "timeouts": sum(o.codes["DEADLINE_EXCEEDED"] for o, _ in results),
            "rss_mb_per_run": rss, "rss_growth_mb": round(growth, 1),
            "rss_flat": growth <= max(16.0, 0.05 * rss[0])}


# ---- faults ------------------------------------------------------------------------------------
# Each returns a dict with "survived" (bool) and what was seen; `lost` is added to data_lost.
async def _load_during(rs: ReliabilityStack, action, *, seconds: float, new_tokens: int, address: str | None = None):
    """Background load on a decoder while `action` (blocking, in a thread) runs."""
    task = asyncio.ensure_future(closed_loop(address or rs.address("decoder"), rs.prompts, clients=rs.max_batch,
                                             seconds=seconds, new_tokens=new_tokens))
    await asyncio.sleep(min(1.0, seconds / 4))
    result = await asyncio.to_thread(action)
    return await task, result


def fault_redis_restart(rs: ReliabilityStack, *, seconds: float = 6.0, new_tokens: int = 24) -> dict:
    """Redis SIGKILLed under load, restarted on its port: no stream fails, Redis is used again."""
    def kill_then_restart() -> None:
        rs.kill("redis")
        time.sleep(seconds / 3)
        rs.restart_redis()

    out, _ = _run(_load_during(rs, kill_then_restart, seconds=seconds, new_tokens=new_tokens))
    hits = rs.metric("memory", "memory3_memory_hits_total", '{tier="redis"}')
    used_again = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not used_again:
        _run(burst(rs.address("decoder"), rs.prompts[:2] * 2, new_tokens=2))
        used_again = rs.metric("memory", "memory3_memory_hits_total", '{tier="redis"}') > hits
        time.sleep(0.5)
    errors = sum(v for k, v in out.codes.items() if k != "OK")
    return {"survived": errors == 0 and used_again and out.codes["OK"] > 0, "load": out.summary(),
            "details": out.details, "redis_used_again": used_again, "lost": out.lost}


def fault_s3_restart(rs: ReliabilityStack, *, new_tokens: int = 8) -> dict:
    """S3 SIGKILLed: requests needing uncached memories fail fast with UNAVAILABLE ("fail") or are
    generated without memory with a warning ("continue"); after a restart both recover."""
    rs.s3.process.kill()
    rs.s3.process.wait()
    rs.flush_redis()
    prompts = rs.prompts[8:8 + rs.max_batch]
    failing = _run(burst(rs.address("decoder"), prompts, new_tokens=new_tokens))
    continuing = _run(burst(rs.address("decoder-continue"), prompts[:rs.max_streams_per_client],
                            new_tokens=new_tokens))
    rs.restart_s3()
    recovered = _recovers(rs, "decoder", prompts[:1], new_tokens)
    fail_ok = set(failing.codes) == {"UNAVAILABLE"}
    continue_ok = continuing.codes == Counter({"OK": len(prompts[:rs.max_streams_per_client])}) and \
        continuing.warned == continuing.codes["OK"]
    return {"survived": fail_ok and continue_ok and recovered is not None,
            "fail_policy": failing.summary(), "continue_policy": continuing.summary(),
            "details": failing.details + continuing.details, "recovered_after_s": recovered,
            "lost": failing.lost + continuing.lost}


def _recovers(rs: ReliabilityStack, decoder: str, prompts: list[str], new_tokens: int,
              timeout_s: float = 30.0) -> float | None:
    """Seconds until a request with memory succeeds again (None: not within the timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        out = _run(burst(rs.address(decoder), prompts, new_tokens=new_tokens))
        if out.codes["OK"] == len(prompts) and not out.warned:
            return round(time.monotonic() - start, 2)
        time.sleep(0.5)
    return None


def fault_slow_s3(rs: ReliabilityStack, *, delay_s: float = 0.4, new_tokens: int = 8) -> dict:
    """Every S3 request delayed: requests still succeed (slower); a short deadline is honoured
    (DEADLINE_EXCEEDED, not a hang) and frees its slot."""
    rs.flush_redis()
    rs.proxy.delay_s = delay_s
    try:
        slow = _run(burst(rs.address("decoder"), rs.prompts[16:16 + rs.max_batch], new_tokens=new_tokens))
        rs.flush_redis()
        short = _run(burst(rs.address("decoder"), rs.prompts[20:22], new_tokens=new_tokens, timeout_s=delay_s / 2))
    finally:
        rs.proxy.delay_s = 0.0
    zero = rs.gauges_return_to_zero()
    return {"survived": set(slow.codes) == {"OK"} and set(short.codes) == {"DEADLINE_EXCEEDED"} and zero,
            "delay_s": delay_s, "slow": slow.summary(), "short_deadline": short.summary(),
            "details": slow.details, "gauges_return_to_zero": zero, "lost": slow.lost + short.lost}


def fault_corrupt_blob(rs: ReliabilityStack, *, new_tokens: int = 4) -> dict:
    """A memory corrupted in S3: the request that needs it gets DATA_LOSS naming it, never a
    generation from it; repaired, it is served again."""
    from memory3.model.memory_format import HEADER_SIZE
    from memory3.v1 import generation_service_pb2 as pb
    from memory3.v1 import generation_service_pb2_grpc as pb_grpc

    prompt = rs.prompts[30]
    with grpc.insecure_channel(rs.address("decoder")) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = next(stub.Generate(pb.GenerateRequest(prompt=prompt, params=pb.GenerationParams(max_tokens=1)),
                                   timeout=60))
        victim = first.citations[0].references[0].id
        key = rs.memory_key(victim)
        good = rs.store.get_bytes(key)
        bad = bytearray(good)
        bad[HEADER_SIZE + 5] ^= 0xFF
        corrupt_before = rs.metric("memory", "memory3_memory_corrupt_total", '{tier="s3"}')
        rs.store.put_bytes(key, bytes(bad))
        rs.flush_redis()
        try:
            out = _run(burst(rs.address("decoder"), [prompt], new_tokens=new_tokens))
        finally:
            rs.store.put_bytes(key, good)
        named = any(victim in d for d in out.details)
        detected = rs.metric("memory", "memory3_memory_corrupt_total", '{tier="s3"}') > corrupt_before
        again = _run(burst(rs.address("decoder"), [prompt], new_tokens=new_tokens))
    return {"survived": set(out.codes) == {"DATA_LOSS"} and named and detected and again.codes["OK"] == 1,
            "codes": dict(out.codes), "named_in_error": named, "counted_corrupt": detected,
            "served_after_repair": again.codes["OK"] == 1, "lost": out.lost + again.lost}


def fault_text_down(rs: ReliabilityStack, *, new_tokens: int = 8) -> dict:
    """The text service killed: "fail" answers UNAVAILABLE fast (and turns NOT_SERVING);
    "continue" generates without memory and says so; both recover after a restart."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def health(name: str) -> int:
        with grpc.insecure_channel(rs.address(name)) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status

    rs.kill("text")
    prompts = rs.prompts[40:40 + rs.max_batch]
    failing = _run(burst(rs.address("decoder"), prompts, new_tokens=new_tokens))
    continuing = _run(burst(rs.address("decoder-continue"), prompts[:rs.max_streams_per_client],
                            new_tokens=new_tokens))
    deadline = time.monotonic() + 10
    while health("decoder") == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
        time.sleep(0.2)
    not_serving = health("decoder") == health_pb2.HealthCheckResponse.NOT_SERVING
    still_serving = health("decoder-continue") == health_pb2.HealthCheckResponse.SERVING
    rs.restart_service("text")
    recovered = _recovers(rs, "decoder", prompts[:1], new_tokens)
    recovered_continue = _recovers(rs, "decoder-continue", prompts[:1], new_tokens)
    fast = failing.error_latency and max(failing.error_latency) < 2.0
    fail_ok = set(failing.codes) == {"UNAVAILABLE"} and bool(fast)
    continue_ok = set(continuing.codes) == {"OK"} and continuing.warned == continuing.codes["OK"]
    return {"survived": fail_ok and continue_ok and not_serving and still_serving and recovered is not None
            and recovered_continue is not None,
            "fail_policy": failing.summary(), "continue_policy": continuing.summary(),
            "fail_decoder_not_serving": not_serving, "continue_decoder_serving": still_serving,
            "recovered_after_s": recovered, "continue_recovered_after_s": recovered_continue,
            "details": failing.details + continuing.details, "lost": failing.lost + continuing.lost}


def fault_client_stream_limit(rs: ReliabilityStack, *, new_tokens: int = 48) -> dict:
    """One client (x-client-id) past --max-streams-per-client gets RESOURCE_EXHAUSTED; another is served."""
    n = rs.max_streams_per_client
    greedy = _run(burst(rs.address("decoder-continue"), rs.prompts[:n + 2], new_tokens=new_tokens,
                        memory=False, metadata=(("x-client-id", "greedy"),)))
    other = _run(burst(rs.address("decoder-continue"), rs.prompts[:1], new_tokens=2, memory=False,
                       metadata=(("x-client-id", "polite"),)))
    ok = greedy.codes == Counter({"OK": n, "RESOURCE_EXHAUSTED": 2}) and other.codes == Counter({"OK": 1})
    return {"survived": ok, "limit": n, "greedy": dict(greedy.codes), "other": dict(other.codes),
            "lost": greedy.lost + other.lost}


def fault_decoder_sigterm(rs: ReliabilityStack, *, new_tokens: int = 300) -> dict:
    """SIGTERM under load: in-flight streams finish, new requests are refused, the process exits 0."""
    from memory3.v1 import generation_service_pb2_grpc as pb_grpc

    pid = rs.process("decoder").pid
    address = rs.address("decoder")

    async def scenario():
        inflight = asyncio.ensure_future(burst(address, rs.prompts[:rs.max_batch], new_tokens=new_tokens,
                                               memory=False))
        deadline, running = time.monotonic() + 20, 0.0
        while time.monotonic() < deadline and not inflight.done():  # every stream holds a batch row
            running = await asyncio.to_thread(rs.metric, "decoder", "memory3_num_requests_running")
            if running == rs.max_batch:
                break
            await asyncio.sleep(0.05)
        rs.killed.add("decoder")
        os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(0.3)
        refused = Outcomes()
        async with grpc.aio.insecure_channel(address) as channel:
            await generate_once(pb_grpc.GenerationServiceStub(channel), rs.prompts[0], refused, new_tokens=2,
                                timeout_s=10)
        return await inflight, refused, running

    inflight, refused, running = _run(scenario())
    status = _wait_exit(pid)
    ok = (inflight.codes == Counter({"OK": rs.max_batch}) and set(refused.codes) == {"UNAVAILABLE"} and status == 0
          and running == rs.max_batch)
    return {"survived": ok, "running_at_sigterm": running, "inflight": dict(inflight.codes),
            "refused": dict(refused.codes), "exit_status": status, "details": inflight.details,
            "lost": inflight.lost + refused.lost}


def memories_lost(rs: ReliabilityStack) -> int:
    """Bank memories that no longer come back from the memory service identical to the bank."""
    from memory3.services.memory.client import MemoryClient
    from memory3.services.memory.engine import ids_per_reply
    from memory3.services.rpc.server import MAX_MESSAGE_BYTES, client_channel

    ids = rs.reference_ids()
    expected = {rid: rs.store.get_bytes(rs.memory_key(rid)) for rid in ids}
    # requests as large as one reply carries, as the decoder's client splits them
    per_request = ids_per_reply(max(map(len, expected.values()), default=1), MAX_MESSAGE_BYTES)

    async def fetch():
        async with client_channel(rs.address("memory")) as channel:
            return await MemoryClient(channel, timeout_s=30, max_ids=per_request).get(ids)

    try:
        blobs = _run(fetch())
    except Exception:  # noqa: BLE001 - any failure here means memories cannot be read back
        return len(ids)
    return sum(1 for rid, blob in zip(ids, blobs, strict=True) if blob != expected[rid])


# ---- the benchmark -------------------------------------------------------------------------------
def run_reliability_bench(*, preset: str = "tiny", max_batch: int = 4, max_waiting: int = 4, seconds: float = 5.0,
                          new_tokens: int = 24, fuzz: int = 300, seed: int = 0, log=print) -> dict:
    from .fuzz import fuzz_services
    from .machine import machine_info

    faults: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="memory3-reliability-") as tmp, \
            ReliabilityStack(Path(tmp), preset=preset, max_batch=max_batch, max_waiting=max_waiting, seed=seed,
                             log=log) as rs:
        log("load ...")
        nominal = load(rs, seconds=seconds, new_tokens=new_tokens)
        log(f"load: {nominal['tok_s']} tok/s, TTFT p50 {nominal['ttft']['p50_ms']} ms; overload ...")
        over = overload(rs, seconds=seconds, new_tokens=new_tokens)
        log(f"overload: {over['by_code']}, RESOURCE_EXHAUSTED p99 {over['resource_exhausted_latency']['p99_ms']} ms, "
            f"RSS {over['rss_mb_per_run']} MB")
        steps = [("redis_killed_and_restarted", lambda: fault_redis_restart(rs, new_tokens=new_tokens)),
                 ("s3_killed_and_restarted", lambda: fault_s3_restart(rs)),
                 ("slow_s3", lambda: fault_slow_s3(rs)),
                 ("corrupt_blob", lambda: fault_corrupt_blob(rs)),
                 ("text_service_down", lambda: fault_text_down(rs)),
                 ("client_stream_limit", lambda: fault_client_stream_limit(rs)),
                 ("bad_inputs", lambda: fuzz_services(rs, count=fuzz, seed=seed))]
        crashes: set[str] = set()
        for name, step in steps:
            log(f"fault: {name} ...")
            try:
                faults[name] = step()
            except Exception as e:  # noqa: BLE001 - a fault the harness could not finish is not survived
                faults[name] = {"survived": False, "error": f"{type(e).__name__}: {e}"[:500]}
            crashes.update(rs.crashed())
            faults[name]["survived"] = faults[name]["survived"] and not rs.crashed()
            log(f"fault: {name}: {'survived' if faults[name]['survived'] else 'NOT survived'}")
        lost_memories = memories_lost(rs)
        log("fault: decoder_sigterm_under_load ...")
        faults["decoder_sigterm_under_load"] = fault_decoder_sigterm(rs)
        crashes.update(rs.crashed())
        leaked = rs.secrets_in_logs()
    lost_streams = nominal["lost"] + over["lost"] + sum(f.get("lost", 0) for f in faults.values())
    summary = {
        "faults_injected": len(faults),
        "faults_survived": sum(1 for f in faults.values() if f["survived"]),
        "bad_inputs_tried": faults["bad_inputs"].get("tried", 0),
        "crashes": len(crashes),
        "data_lost": lost_streams + lost_memories,
        "tok_s": nominal["tok_s"],
        "ttft_p50_ms": nominal["ttft"]["p50_ms"], "ttft_p99_ms": nominal["ttft"]["p99_ms"],
        "itl_p50_ms": nominal["itl"]["p50_ms"], "itl_p99_ms": nominal["itl"]["p99_ms"],
        "overload_resource_exhausted": over["by_code"].get("RESOURCE_EXHAUSTED", 0),
        "overload_resource_exhausted_p99_ms": over["resource_exhausted_latency"]["p99_ms"],
        "overload_timeouts": over["timeouts"],
        "gauges_return_to_zero": nominal["gauges_return_to_zero"] and over["gauges_return_to_zero"],
        "decoder_rss_growth_mb": over["rss_growth_mb"],
        "credentials_in_logs": len(leaked),
    }
    return {"benchmark": "reliability", "summary": summary, **summary,
            "load": nominal, "overload": over, "faults": faults,
            "data_lost_detail": {"streams": lost_streams, "memories": lost_memories},
            "crashed": sorted(crashes), "logs_with_credentials": leaked,
            "protocol": {"preset": preset, "weights": "random init", "max_batch": max_batch,
                         "max_waiting": max_waiting, "seconds_per_load": seconds, "new_tokens": new_tokens,
                         "fuzz_requests": fuzz, "seed": seed,
                         "processes": "S3 (behind a delay proxy), Redis, text, memory, two decoders on one machine"},
            "machine": machine_info()}
