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
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationRequest
from memory3.services.decoder.retrieval import RetrievedReference

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
                     ramp_s: float = 0.0) -> dict:
    before = os.sched_getaffinity(0), torch.get_num_threads()
    if cores:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    try:
        return _run(preset=preset, rows=rows, clients=clients, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                    rounds=rounds, round_s=round_s, retrieve_s=retrieve_s, fetch_s=fetch_s, cores=cores, seed=seed,
                    ramp_s=ramp_s)
    finally:
        os.sched_setaffinity(0, before[0])
        torch.set_num_threads(before[1])


def _run(*, preset, rows, clients, prompt_tokens, new_tokens, rounds, round_s, retrieve_s, fetch_s, cores,
         seed, ramp_s) -> dict:
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

    async def closed_loop(memory_on: bool, seconds: float) -> float:
        """As the services' closed loop (bench/serving.py): clients start one by one over ramp_s."""
        received = 0
        start = time.perf_counter()
        measured_from, deadline = start + ramp_s, start + ramp_s + seconds

        async def client(i: int) -> None:
            nonlocal received
            k = i
            await asyncio.sleep(ramp_s * i / clients)
            while time.perf_counter() < deadline:
                events = engine.generate(GenerationRequest(prompts[k % len(prompts)], new_tokens,
                                                           use_memory=memory_on, ignore_eos=True))
                async for event in events:
                    now = time.perf_counter()
                    if now >= deadline:
                        break
                    if now >= measured_from:
                        received += len(event.token_ids)
                await events.aclose()  # frees the slot at once
                k += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
        tok_s = received / (time.perf_counter() - measured_from)
        while engine.accepted:  # the cancelled streams leave before the next run starts
            await asyncio.sleep(0.01)
        return tok_s

    async def main() -> tuple[list[float], list[float]]:
        await engine.start()
        try:
            await closed_loop(True, round_s / 2)  # warm-up
            on, off = [], []
            for r in range(rounds):
                for memory_on in ((True, False) if r % 2 == 0 else (False, True)):
                    (on if memory_on else off).append(await closed_loop(memory_on, round_s))
            return on, off
        finally:
            await engine.close()

    on, off = asyncio.run(main())
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    return {"engine_on_over_off": round(statistics.median(ratios), 4),
            "on_tok_s": [round(x, 2) for x in on], "off_tok_s": [round(x, 2) for x in off],
            "per_round_ratios": [round(x, 4) for x in ratios],
            "simulated_latency_ms": {"retrieve": round(retrieve_s * 1e3, 3), "fetch": round(fetch_s * 1e3, 3)},
            "cores": sorted(cores) if cores else "all"}
