"""The decoder engine alone, retrieval on vs off: what the engine's design costs, apart from the machine.

`memory3 bench serving` measures retrieval on vs off through the real services. On one small
machine those services share the hardware with the decoder, so that ratio mixes two costs. This
arm runs the same engine in-process on the decoder's cores, with nothing else running, and a
retrieval that answers after the latencies the same run measured on the real services (one chunk's
retrieval, and a Redis-hit fetch): streams still pause at their chunk boundaries for as long as
the real round trip takes, but no other process competes for the machine.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import torch

from memory3.model.config import Memory3Config
from memory3.model.encoder import encode_references
from memory3.model.init import random_model
from memory3.model.layout import chunk_spans
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationRequest, Scheduler, _Stream
from memory3.services.decoder.retrieval import RetrievedReference

from .closed_loop import ClosedLoop, median_interval

BANK = 64  # distinct memories; each query gets 5 of them


class SimulatedRetrieval:
    """Answers after fixed latencies with memories from an in-process bank."""

    def __init__(self, bank, retrieve_s: float, fetch_s: float) -> None:
        self.bank, self.retrieve_s, self.fetch_s = bank, retrieve_s, fetch_s

    async def retrieve(self, queries, top_k, include_text):
        await asyncio.sleep(self.retrieve_s)
        return [[RetrievedReference(f"m{(sum(q) + j) % len(self.bank)}", 1.0, "") for j in range(top_k)]
                for q in queries]

    async def fetch(self, ids):
        await asyncio.sleep(self.fetch_s)
        return [self.bank[int(i[1:])] for i in ids]


def run_engine_alone(*, preset: str, rows: int, clients: int, prompt_tokens: int, new_tokens: int, rounds: int,
                     round_s: float, retrieve_s: float, fetch_s: float, cores: set[int] | None, seed: int = 0,
                     ramp_s: float = 0.0, log=lambda _msg: None) -> dict:
    before = os.sched_getaffinity(0), torch.get_num_threads()
    if cores:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    try:
        return _run(preset=preset, rows=rows, clients=clients, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                    rounds=rounds, round_s=round_s, retrieve_s=retrieve_s, fetch_s=fetch_s, cores=cores, seed=seed,
                    ramp_s=ramp_s, log=log)
    finally:
        os.sched_setaffinity(0, before[0])
        torch.set_num_threads(before[1])


def _run(*, preset, rows, clients, prompt_tokens, new_tokens, rounds, round_s, retrieve_s, fetch_s, cores,
         seed, ramp_s, log) -> dict:
    config = Memory3Config.from_name(preset)
    model = random_model(config, seed=seed)
    codec = TextCodec(byte_level_tokenizer())
    gen = torch.Generator().manual_seed(seed)

    def random_tokens(n: int) -> list[int]:
        return torch.randint(3, codec.vocab_size, (n,), generator=gen).tolist()

    with torch.inference_mode():
        bank = encode_references(model, [random_tokens(config.ref_len) for _ in range(BANK)],
                                 codec.reference_prefix(config))
    prompts = [[codec.bos_id, *random_tokens(prompt_tokens - 1)] for _ in range(128)]
    engine = GenerationEngine(model, codec, SimulatedRetrieval(bank, retrieve_s, fetch_s),
                              EngineConfig(max_batch=rows, max_waiting=clients,
                                           max_seq_len=prompt_tokens + new_tokens + 64))

    async def open_stream(k: int, memory_on: bool):
        events = engine.generate(GenerationRequest(prompts[k % len(prompts)], new_tokens, use_memory=memory_on,
                                                   ignore_eos=True))
        try:
            async for event in events:
                yield len(event.token_ids), len(event.citations)
        finally:
            await events.aclose()  # frees the slot at once

    async def main() -> tuple[list[float], list[float]]:
        """The services' protocol (bench/serving.py): one closed loop, paired phases, on first or second by turns."""
        await engine.start()
        loop = ClosedLoop(open_stream, clients)
        try:
            await loop.start(ramp_s)
            await loop.phase(True, round_s)  # warm-up, as through the services
            await loop.phase(False, round_s)
            on, off = [], []
            for r in range(rounds):
                for memory_on in ((True, False) if r % 2 == 0 else (False, True)):
                    (on if memory_on else off).append((await loop.phase(memory_on, round_s))[0])
                log(f"engine alone, round {r + 1}/{rounds}: tok/s with retrieval on {on[-1]:.0f}, off {off[-1]:.0f}")
            return on, off
        finally:
            await loop.stop()
            await engine.close()

    on, off = asyncio.run(main())
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    costs = step_costs(model, codec, bank, prompts, rows=rows, max_seq_len=prompt_tokens + new_tokens + 64,
                       context_tokens=prompt_tokens + new_tokens // 2, new_tokens=new_tokens)
    return {"engine_on_over_off": round(statistics.median(ratios), 4),
            "engine_on_over_off_ci90": median_interval(ratios), "step_costs": costs,
            "on_tok_s": [round(x, 2) for x in on], "off_tok_s": [round(x, 2) for x in off],
            "per_round_ratios": [round(x, 4) for x in ratios],
            "simulated_latency_ms": {"retrieve": round(retrieve_s * 1e3, 3), "fetch": round(fetch_s * 1e3, 3)},
            "cores": sorted(cores) if cores else "all"}


def read_prompt(scheduler: Scheduler, stream: _Stream) -> None:
    """What the scheduler does for a stream that joins its row: ready the row, then read the whole
    prompt in one pass (its `prefill_tokens` would split a longer one)."""
    scheduler._start_rows([stream])
    scheduler._prefill([(stream, len(stream.request.prompt_ids))])


def step_costs(model, codec, bank, prompts: list[list[int]], *, rows: int, max_seq_len: int, context_tokens: int,
               new_tokens: int, iterations: int = 120) -> dict:
    """What the engine's own passes cost with memory and without, timed back to back.

    The closed loops above drift with the machine by more than the difference they measure; here
    each pass with memory is paired with the same pass without, one after the other, through the
    scheduler's own code: a decode step of a full batch (every row `context_tokens` in; with memory,
    the reference prefix in front and five memories resident), and the prefill of one prompt (with
    memory: the prefix and the memories of each of its chunks, the last chunk's kept resident).
    `predicted_on_over_off` is the throughput ratio these two alone give, a request costing one
    prefill and `new_tokens` decode steps of a row."""
    config = model.config
    scheduler = Scheduler(model, EngineConfig(max_batch=rows, max_seq_len=max_seq_len),
                          stop_token_ids=[], prefix=codec.reference_prefix(config))
    loop = asyncio.new_event_loop()

    def stream(prompt: list[int], memory: bool) -> _Stream:
        request = GenerationRequest(prompt, max_seq_len, use_memory=memory, ignore_eos=True)
        groups = [[bank[(g * 5 + j) % len(bank)] for j in range(5)]
                  for g in range(len(chunk_spans(len(prompt), config.chunk_len)))] if memory else []
        return _Stream(request, len(scheduler.prefix) if memory else 0, groups, loop, asyncio.Queue(), time.monotonic())

    layouts = {}
    with torch.inference_mode():
        for memory in (True, False):  # a batch of each layout in caches of its own
            model.setup_caches(rows, max_seq_len, memory=True)
            scheduler.rows, scheduler.row_has_prefix = [None] * rows, [False] * rows
            batch = []
            for row in range(rows):
                body = [t for k in range(row, row + 4) for t in prompts[k % len(prompts)][1:]]
                s = stream([codec.bos_id, *body][:context_tokens], memory)
                s.row, scheduler.rows[row] = row, s
                read_prompt(scheduler, s)
                batch.append(s)
            layouts[memory] = ([layer.attention.kv_cache for layer in model.layers], list(scheduler.rows),
                               list(scheduler.row_has_prefix), batch)
        times: dict[str, dict[bool, list[float]]] = {"decode": {True: [], False: []}, "prefill": {True: [], False: []}}
        for i in range(iterations):
            for memory in ((True, False) if i % 2 == 0 else (False, True)):
                caches, scheduler.rows, scheduler.row_has_prefix, batch = layouts[memory]
                model.attach_caches(caches)
                slots = [s.next_slot for s in batch]
                start = time.perf_counter()
                scheduler._decode(batch)
                times["decode"][memory].append(time.perf_counter() - start)
                for s, slot in zip(batch, slots, strict=True):  # the same slots again next time: shapes stay
                    s.next_slot = slot
                joining = stream(prompts[i % len(prompts)], memory)
                joining.row = 0
                start = time.perf_counter()
                read_prompt(scheduler, joining)
                times["prefill"][memory].append(time.perf_counter() - start)
                scheduler.outbox.clear()
        model.clear_caches()
    loop.close()
    warm = iterations // 10
    out: dict = {"rows": rows, "context_tokens": context_tokens, "iterations": iterations}
    for name, arms in times.items():
        with_memory, plain = arms[True][warm:], arms[False][warm:]
        out[f"{name}_ms"] = {"memory": round(1e3 * statistics.median(with_memory), 3),
                             "plain": round(1e3 * statistics.median(plain), 3)}
        out[f"{name}_memory_over_plain"] = round(statistics.median(
            [a / b for a, b in zip(with_memory, plain, strict=True)]), 4)
    per_request = {memory: new_tokens * out["decode_ms"][key] / rows + out["prefill_ms"][key]
                   for memory, key in ((True, "memory"), (False, "plain"))}
    out["predicted_on_over_off"] = round(per_request[False] / per_request[True], 4)
    return out
