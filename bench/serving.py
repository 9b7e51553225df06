"""Serving benchmark: the whole stack as separate processes on this machine, measured as a client.

Starts a private stack (S3 server, Redis, text, memory and decoder services) in a temporary
directory over a random-weights release of the given preset (speed does not depend on weights),
then measures through gRPC:
  - memory fetch of 5 memories: Redis hit, and S3 miss (Redis flushed; the memory service runs
    without its RAM tier so that the tiers themselves are measured);
  - retrieval of one 64-token chunk;
  - time to first token and inter-token latency at several concurrencies;
  - throughput with retrieval on vs off through the same services: a closed loop of clients (a
    quarter more than the decoder's batch rows) that send requests back to back (streams start and
    finish at different times, as in production: the clients start one by one over an unmeasured
    ramp, so that they never move in step, and run throughout), switched between the arms in short
    adjacent phases (`ClosedLoop`), in interleaved rounds whose paired ratios are summarised by their
    median and its bootstrap interval, after one unmeasured warm-up phase of each arm (reported
    apart); the decoder runs with its defaults (its cache of decoded memories, whose hit rate is
    reported, and its retrieval lead);
  - a control arm: retrieval off while the bench itself makes as many retrievals per second (each
    followed by the fetch of its memories) as the decoder made in the round's retrieval-on phase.
    On one machine the text service's embedder competes with the decoder for the hardware even on other cores (shared
    caches, memory bandwidth, or hyperthreads of a virtual machine); on/off-with-that-load is what
    the decoder's own pipeline costs (pauses, fetches, memory attention), and off-with-load/off is
    what sharing the machine costs; the decoder's own counters (tokens it generated per second, CPU
    seconds it spent per token) are read over the on and off runs too;
  - the engine alone (bench/serving_engine.py): the same on/off comparison in-process on the
    decoder's cores, retrieval answering after the latencies measured above, nothing else running;
    and the engine's decode step and prefill with memory and without, timed back to back, which
    say what memory costs the passes themselves, free of the machine's drift.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from memory3.services.stack import StackOptions, StackState, start_stack, stop_processes

from .closed_loop import ClosedLoop, median_interval
from .machine import machine_info
from .serving_engine import run_engine_alone

RELEASE = "bench-serving"


def _documents(n: int, seed: int) -> list[tuple[str, str]]:
    from memory3.services.trainer.world import World

    world = World(seed, n_train=n, n_heldout=1)
    return [(e.id, e.document) for e in world.entities[:n]]


def _placement() -> dict[str, set[int]]:
    """Half the cores for the decoder, the rest for everything else: text and memory services,
    stores and the load-generating clients (as separate nodes would be). The decoder gets the same
    cores in the retrieval-on and -off runs."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {}
    half = len(cores) // 2
    decoder, others = set(cores[:half]), set(cores[half:])
    return {"decoder": decoder, "text": others, "memory": others}


def _closed_loop_clients(rows: int) -> int:
    """More clients than batch rows, as under autoscaled traffic: a queue keeps every row busy, so
    what retrieval costs shows as rows waiting for memories, not as rows nobody asked for."""
    return rows + max(1, rows // 4)


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    xs = sorted(xs)
    return {"p50_ms": round(1000 * xs[len(xs) // 2], 3),
            "p99_ms": round(1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 3), "n": len(xs)}


def run_serving_bench(*, preset: str = "small", concurrency: tuple[int, ...] = (1, 8, 32), prompt_tokens: int = 128,
                      new_tokens: int = 128, rounds: int = 15, samples: int = 30, documents: int = 400,
                      seed: int = 0, pin: bool = True, round_s: float = 6.0, ramp_s: float = 4.0,
                      log=print) -> dict:
    from memory3.services.release.synthetic import publish_random_release
    from memory3.services.storage.object_store import ObjectStore

    docs = _documents(documents, seed)
    affinity = _placement() if pin else {}
    with tempfile.TemporaryDirectory(prefix="memory3-bench-") as tmp:
        options = StackOptions(home=Path(tmp), release=RELEASE, max_batch=max(concurrency), ready_timeout_s=300,
                               cpu_affinity=affinity,
                               extra_args={"memory": ("--ram-cache-mb", "0"),
                                           "decoder": ("--max-seq-len", str(prompt_tokens + new_tokens + 64))})
        state = start_stack(options, log=log, ensure_release=lambda s3, name: publish_random_release(
            ObjectStore(s3), name, docs, preset=preset, seed=seed))
        own_cores = os.sched_getaffinity(0)
        try:
            if affinity:  # the stores and this process (the clients) stay off the decoder's cores too
                for p in state.processes:
                    if p.name in ("s3", "redis"):
                        os.sched_setaffinity(p.pid, affinity["text"])
                os.sched_setaffinity(0, affinity["text"])
            result = asyncio.run(_measure(state, docs, concurrency=concurrency, prompt_tokens=prompt_tokens,
                                          new_tokens=new_tokens, rounds=rounds, samples=samples, seed=seed, log=log,
                                          round_s=round_s, ramp_s=ramp_s))
        finally:
            os.sched_setaffinity(0, own_cores)
            stop_processes(state.processes)
    log("engine alone, simulated retrieval latency ...")
    rows = max(concurrency)
    result["engine_alone"] = run_engine_alone(
        preset=preset, rows=rows, clients=_closed_loop_clients(rows), prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, rounds=rounds, round_s=round_s, ramp_s=ramp_s,
        retrieve_s=result["retrieval"]["p50_ms"] / 1e3,
        fetch_s=result["fetch5"]["redis_hit"]["p50_ms"] / 1e3, cores=affinity.get("decoder"), seed=seed,
        log=log)
    result["summary"]["engine_on_over_off"] = result["engine_on_over_off"] = \
        result["engine_alone"]["engine_on_over_off"]
    result["summary"]["engine_predicted_on_over_off"] = result["engine_alone"]["step_costs"]["predicted_on_over_off"]
    result["protocol"] = {"preset": preset, "concurrency": list(concurrency), "prompt_tokens": prompt_tokens,
                          "new_tokens": new_tokens, "rounds": rounds, "samples": samples, "documents": documents,
                          "seconds_per_phase": round_s, "ramp_seconds": ramp_s, "weights": "random init",
                          "processes": "S3, Redis, text, memory, decoder on one machine",
                          "memory_tiers": "memory service without its RAM tier; the decoder with its own "
                                          "cache of decoded memories at the default size (hit rate in on_off)",
                          "retrieval_lead_tokens": "the decoder's default",
                          "ratio_statistic": "median of per-round paired ratios; 90% bootstrap interval",
                          "cpu_placement": {k: sorted(v) for k, v in affinity.items()} or "shared"}
    result["machine"] = machine_info()
    return result


async def _measure(state: StackState, docs, *, concurrency, prompt_tokens, new_tokens, rounds, samples, seed,
                   log, round_s: float, ramp_s: float) -> dict:
    import grpc
    import redis

    from memory3.services.memory.client import MemoryClient
    from memory3.services.text.client import TextClient

    rng = random.Random(seed)
    text_channel = grpc.aio.insecure_channel(state.address("text"))
    memory_channel = grpc.aio.insecure_channel(state.address("memory"))
    decoder_channel = grpc.aio.insecure_channel(state.address("decoder"),
                                                options=[("grpc.max_concurrent_streams", 1000)])
    try:
        text, memory = TextClient(text_channel), MemoryClient(memory_channel)
        cache = redis.Redis.from_url(state.redis_url)

        # ---- retrieval and fetch ----
        retrieval, hit, miss = [], [], []
        for _ in range(samples):
            q = (await text.tokenize(" ".join(rng.choice(docs)[1] for _ in range(3))))[:64]  # one chunk
            start = time.perf_counter()
            found = await text.retrieve([q], 5)
            retrieval.append(time.perf_counter() - start)
            ids = [rid for rid, _, _ in found[0]]
            cache.flushall()
            start = time.perf_counter()
            await memory.get(ids)
            miss.append(time.perf_counter() - start)
            start = time.perf_counter()
            await memory.get(ids)
            hit.append(time.perf_counter() - start)
        log(f"fetch of 5: Redis hit p50 {statistics.median(hit) * 1e3:.2f} ms, "
            f"S3 miss p50 {statistics.median(miss) * 1e3:.2f} ms; retrieval p50 "
            f"{statistics.median(retrieval) * 1e3:.2f} ms")

        prompts = [" ".join(rng.choice(docs)[1] for _ in range(4))[: prompt_tokens - 1] for _ in range(128)]
        # ---- latency at each concurrency (retrieval on) ----
        latency = {}
        await _generate_all(decoder_channel, prompts[:2], new_tokens, memory_on=True)  # warm-up
        for c in concurrency:
            ttft, itl, tokens, wall = await _generate_all(decoder_channel, prompts[:c], new_tokens, memory_on=True)
            latency[str(c)] = {"ttft": _percentiles(ttft), "itl": _percentiles(itl),
                               "tok_s": round(tokens / wall, 2)}
            log(f"concurrency {c}: TTFT p50 {latency[str(c)]['ttft']['p50_ms']} ms, ITL p50 "
                f"{latency[str(c)]['itl']['p50_ms']} ms, {tokens / wall:.0f} tok/s")

        # ---- retrieval on vs off: closed-loop load, interleaved phases ----
        c = _closed_loop_clients(max(concurrency))
        load_queries = [(await text.tokenize(" ".join(rng.choice(docs)[1] for _ in range(3))))[:64]
                        for _ in range(64)]
        on, off, loaded, rates, served_rates = [], [], [], [], []
        decoder_on, decoder_off = DecoderCounters(state), DecoderCounters(state)
        clients = ClosedLoop(grpc_streams(decoder_channel, prompts, new_tokens), c)
        await clients.start(ramp_s)
        try:
            # One unmeasured phase of each arm first: the first minutes at full batch meet cold caches
            # (the decoder's decoded memories, Redis) and a cold allocator, which steady serving does
            # not; their figures are reported apart.
            warm_up = {"on_tok_s": round((await clients.phase(True, round_s))[0], 2),
                       "off_tok_s": round((await clients.phase(False, round_s))[0], 2)}
            for r in range(rounds):
                # The retrieval-on phase goes first: it measures the retrieval rate the control arm replays.
                tok_s, rate = await clients.phase(True, round_s, counters=decoder_on)
                on.append(tok_s)
                rates.append(rate)
                for arm in (("off", "loaded") if r % 2 == 0 else ("loaded", "off")):
                    served: list[int] = []
                    side = _retrieval_load(text, memory, load_queries, rate, served) if arm == "loaded" else None
                    tok_s, answered = await clients.phase(False, round_s, side_load=side,
                                                         counters=decoder_off if arm == "off" else None,
                                                         served=served)
                    (off if arm == "off" else loaded).append(tok_s)
                    if arm == "loaded":
                        served_rates.append(answered)
                log(f"round {r + 1}/{rounds}: tok/s with retrieval on {on[-1]:.0f}, off {off[-1]:.0f}, "
                    f"off with its load {loaded[-1]:.0f}")
        finally:
            await clients.stop()
        # What the decoder's own tier of decoded memories answered over the whole run (see protocol).
        tier = '{tier="decoder"}'
        fetched = state.metric("decoder", "memory3_memory_fetches_total", tier)
        decoder_hit_rate = round(state.metric("decoder", "memory3_memory_hits_total", tier) / fetched, 4) \
            if fetched else None
        ratios = [a / b for a, b in zip(on, off, strict=True)]
        loaded_ratios = [a / b for a, b in zip(on, loaded, strict=True)]
        sharing = [a / b for a, b in zip(loaded, off, strict=True)]
        decoder_ratios = [a / b for a, b in zip(decoder_on.tok_s, decoder_off.tok_s, strict=True)]
        cpu_ratios = [a / b for a, b in zip(decoder_on.cpu_ms_per_token, decoder_off.cpu_ms_per_token, strict=True)]
        # The extra CPU per token with retrieval on, by thread: the scheduler's, and all the others'.
        extra = {"scheduler": [a - b for a, b in zip(decoder_on.scheduler_cpu_ms_per_token,
                                                     decoder_off.scheduler_cpu_ms_per_token, strict=True)],
                 "other_threads": [a - b for a, b in zip(decoder_on.other_cpu_ms_per_token,
                                                         decoder_off.other_cpu_ms_per_token, strict=True)]}
        summary = {
            "retrieval_on_over_off": round(statistics.median(ratios), 4),
            "retrieval_on_over_off_ci90": median_interval(ratios),
            "retrieval_on_tok_s": round(statistics.median(on), 2),
            "retrieval_off_tok_s": round(statistics.median(off), 2),
            "retrieval_on_over_off_loaded": round(statistics.median(loaded_ratios), 4),
            "off_loaded_over_off": round(statistics.median(sharing), 4),
            "decoder_on_over_off": round(statistics.median(decoder_ratios), 4),
            "decoder_cpu_per_token_on_over_off": round(statistics.median(cpu_ratios), 4),
            "decoder_extra_cpu_us_per_token": {k: round(1000 * statistics.median(v), 1) for k, v in extra.items()},
            "decoder_cpu_us_per_token_off": round(1000 * statistics.median(decoder_off.cpu_ms_per_token), 1),
            "fetch5_redis_hit_p50_ms": _percentiles(hit)["p50_ms"],
            "fetch5_s3_miss_p50_ms": _percentiles(miss)["p50_ms"],
            "retrieval_p50_ms": _percentiles(retrieval)["p50_ms"],
            "itl_p50_ms_at_1": latency[str(concurrency[0])]["itl"]["p50_ms"],
        }
        return {"benchmark": "serving", "summary": summary, **summary,
                "fetch5": {"redis_hit": _percentiles(hit), "s3_miss": _percentiles(miss)},
                "retrieval": _percentiles(retrieval), "latency_by_concurrency": latency,
                "on_off": {"clients": c, "seconds_per_phase": round_s, "warm_up": warm_up,
                           "on_tok_s": [round(x, 2) for x in on],
                           "off_tok_s": [round(x, 2) for x in off],
                           "off_loaded_tok_s": [round(x, 2) for x in loaded],
                           "retrievals_per_s": [round(x, 1) for x in rates],
                           "decoder_memory_cache_hit_rate": decoder_hit_rate,
                           "control_retrievals_answered_per_s": [round(x, 1) for x in served_rates],
                           "per_round_ratios": [round(x, 4) for x in ratios],
                           "per_round_ratios_loaded": [round(x, 4) for x in loaded_ratios],
                           "decoder_tok_s": {"on": [round(x, 2) for x in decoder_on.tok_s],
                                             "off": [round(x, 2) for x in decoder_off.tok_s]},
                           "decoder_cpu_ms_per_token": {"on": [round(x, 4) for x in decoder_on.cpu_ms_per_token],
                                                        "off": [round(x, 4) for x in decoder_off.cpu_ms_per_token]},
                           "per_round_ratios_decoder": [round(x, 4) for x in decoder_ratios],
                           "decoder_scheduler_cpu_ms_per_token": {
                               "on": [round(x, 4) for x in decoder_on.scheduler_cpu_ms_per_token],
                               "off": [round(x, 4) for x in decoder_off.scheduler_cpu_ms_per_token]},
                           "per_round_ratios_decoder_cpu_per_token": [round(x, 4) for x in cpu_ratios]}}
    finally:
        for channel in (text_channel, memory_channel, decoder_channel):
            await channel.close()


def grpc_streams(channel, prompts: list[str], new_tokens: int):
    """The decoder's Generate as the closed loop's streams: request k sends prompt k (cycling)."""
    from memory3.v1 import generation_service_pb2 as pb
    from memory3.v1 import generation_service_pb2_grpc as pb_grpc

    stub = pb_grpc.GenerationServiceStub(channel)

    async def open_stream(k: int, memory_on: bool):
        mode = pb.RETRIEVAL_MODE_MEMORY if memory_on else pb.RETRIEVAL_MODE_NONE
        request = pb.GenerateRequest(prompt=prompts[k % len(prompts)],
                                     params=pb.GenerationParams(max_tokens=new_tokens, retrieval=mode,
                                                                ignore_eos=True))
        call = stub.Generate(request, timeout=600)
        try:
            async for response in call:
                yield len(response.token_ids), len(response.citations)  # a citation per chunk retrieved for
        finally:
            call.cancel()  # a no-op once the stream has ended

    return open_stream


class DecoderCounters:
    """Per closed-loop run, the decoder process's own figures from its /metrics: tokens it
    generated per second, and CPU seconds it spent per 1000 of them: all its threads, and its
    scheduler thread (model passes and batching) apart from the rest (gRPC, streaming, retrieval I/O).

    Clients and the retrieval services share the other cores, so the tokens clients receive per
    second also move with how fast the clients read; these say what the decoder itself did, and
    the CPU per token is what retrieval costs the decoder's own core, and on which of its threads."""

    def __init__(self, state: StackState) -> None:
        self.state = state
        self.tok_s: list[float] = []
        self.cpu_ms_per_token: list[float] = []
        self.scheduler_cpu_ms_per_token: list[float] = []
        self._at = (0.0, 0.0, 0.0)

    def _read(self) -> tuple[float, float, float]:
        return (self.state.metric("decoder", "memory3_generation_tokens_total"),
                self.state.metric("decoder", "process_cpu_seconds_total"),
                self.state.metric("decoder", "memory3_scheduler_cpu_seconds_total"))

    def start(self) -> None:
        self._at = self._read()

    def stop(self, elapsed: float) -> None:
        tokens, cpu, scheduler = (b - a for a, b in zip(self._at, self._read(), strict=True))
        self.tok_s.append(tokens / elapsed)
        self.cpu_ms_per_token.append(1000 * cpu / tokens if tokens else float("nan"))
        self.scheduler_cpu_ms_per_token.append(1000 * scheduler / tokens if tokens else float("nan"))

    @property
    def other_cpu_ms_per_token(self) -> list[float]:
        return [a - b for a, b in zip(self.cpu_ms_per_token, self.scheduler_cpu_ms_per_token, strict=True)]


async def _retrieval_load(text, memory, queries: list[list[int]], per_second: float, served: list[int]) -> None:
    """At `per_second`, what the decoder does per chunk: retrieve for a one-chunk query, then fetch
    the memories found. Each is sent without waiting for the previous ones; appends 1 to `served`
    per chunk done."""
    if per_second <= 0:
        return
    pending: set[asyncio.Task] = set()

    async def chunk(query: list[int]) -> None:
        found = (await text.retrieve([query], 5))[0]
        await memory.get([rid for rid, _, _ in found])

    def _forget(task: asyncio.Task) -> None:
        pending.discard(task)
        if not task.cancelled() and task.exception() is None:
            served.append(1)

    start = time.perf_counter()
    try:
        for n in itertools.count():
            await asyncio.sleep(max(0.0, start + n / per_second - time.perf_counter()))
            task = asyncio.ensure_future(chunk(queries[n % len(queries)]))
            pending.add(task)
            task.add_done_callback(_forget)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _generate_all(channel, prompts: list[str], new_tokens: int, *, memory_on: bool):
    """Run one stream per prompt at once; returns (ttft list, itl list, tokens, wall seconds)."""
    from memory3.v1 import generation_service_pb2 as pb
    from memory3.v1 import generation_service_pb2_grpc as pb_grpc

    stub = pb_grpc.GenerationServiceStub(channel)
    mode = pb.RETRIEVAL_MODE_MEMORY if memory_on else pb.RETRIEVAL_MODE_NONE
    ttft: list[float] = []
    itl: list[float] = []
    produced = 0

    async def one(prompt: str) -> None:
        nonlocal produced
        start = time.perf_counter()
        last = None
        request = pb.GenerateRequest(prompt=prompt, params=pb.GenerationParams(max_tokens=new_tokens, retrieval=mode,
                                                                               ignore_eos=True))
        async for response in stub.Generate(request, timeout=600):
            n = len(response.token_ids)
            if not n:
                continue
            now = time.perf_counter()
            if last is None:
                ttft.append(now - start)
            else:
                itl.extend([(now - last) / n] * n)
            last = now
            produced += n

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return ttft, itl, produced, time.perf_counter() - start
