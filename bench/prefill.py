"""A long prompt arriving at a busy decoder: how long the running streams wait, by `prefill_tokens`.

The engine reads at most `prefill_tokens` prompt tokens per scheduler step, with a decode step of the
running streams between two shares. Each round, `rows - 1` streams decode steadily; a prompt of
`long_tokens` then arrives, and the round records:
  stall_ms   the longest gap between two tokens of a running stream while the prompt was read
             (from its arrival to its first token), the pause that stream's client sees;
  ttft_ms    the long prompt's time to its first token, which more, smaller shares lengthen.
Every arm runs in every round, in an order that rotates, on one model in one process, so that arms
compare like with like on a shared machine; reported are each arm's medians and, per round, its
ratios to the arm that reads every prompt in one pass (`prefill_tokens` 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time

import torch

from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationRequest

from .closed_loop import median_interval
from .machine import machine_info


def run_prefill_bench(*, preset: str, rows: int, long_tokens: int, arms: list[int], rounds: int, seed: int = 0,
                      log=lambda _msg: None) -> dict:
    if 0 not in arms:
        arms = [0, *arms]  # the baseline every ratio is taken to
    base = Memory3Config.from_name(preset)
    config = dataclasses.replace(base, max_seq_len=max(base.max_seq_len, long_tokens + 64))
    model = random_model(config, seed=seed)
    codec = TextCodec(byte_level_tokenizer())
    gen = torch.Generator().manual_seed(seed)

    def prompt(n: int) -> list[int]:
        return [codec.bos_id, *torch.randint(3, codec.vocab_size, (n - 1,), generator=gen).tolist()]

    short_prompts, long_prompt = [prompt(16) for _ in range(rows - 1)], prompt(long_tokens)
    results: dict[int, list[tuple[float, float]]] = {arm: [] for arm in arms}
    for r in range(rounds + 1):  # round 0 warms up
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            stall, ttft = asyncio.run(_one_round(model, codec, arm, rows, short_prompts, long_prompt))
            if r:
                results[arm].append((stall, ttft))
        if r:
            log(f"round {r}/{rounds}: " + ", ".join(f"prefill_tokens={a}: stall {results[a][-1][0] * 1e3:.0f} ms, "
                                                  f"ttft {results[a][-1][1] * 1e3:.0f} ms" for a in arms))
    out = {"preset": preset, "rows": rows, "long_tokens": long_tokens, "rounds": rounds,
           "machine": machine_info(), "arms": {}}
    for arm in arms:
        stalls, ttfts = [s for s, _ in results[arm]], [t for _, t in results[arm]]
        stall_ratios = [s / b for s, (b, _) in zip(stalls, results[0], strict=True)]
        ttft_ratios = [t / b for t, (_, b) in zip(ttfts, results[0], strict=True)]
        out["arms"][str(arm)] = {
            "stall_ms": round(statistics.median(stalls) * 1e3, 2),
            "ttft_ms": round(statistics.median(ttfts) * 1e3, 2),
            "stall_over_one_pass": round(statistics.median(stall_ratios), 4),
            "stall_over_one_pass_ci90": median_interval(stall_ratios),
            "ttft_over_one_pass": round(statistics.median(ttft_ratios), 4),
            "ttft_over_one_pass_ci90": median_interval(ttft_ratios),
        }
    out["summary"] = {f"prefill_tokens={arm}": {k: out["arms"][str(arm)][k] for k in
                                                ("stall_ms", "ttft_ms", "stall_over_one_pass", "ttft_over_one_pass")}
                      for arm in arms}
    return out


async def _one_round(model, codec, prefill_tokens: int, rows: int, short_prompts: list[list[int]],
                     long_prompt: list[int]) -> tuple[float, float]:
    engine = GenerationEngine(model, codec, None, EngineConfig(max_batch=rows, max_waiting=0,
                                                               prefill_tokens=prefill_tokens))
    await engine.start()
    arrivals: list[list[float]] = [[] for _ in short_prompts]
    stop = asyncio.Event()

    async def keep_decoding(i: int) -> None:
        request = GenerationRequest(short_prompts[i], model.config.max_seq_len - 64, use_memory=False,
                                    ignore_eos=True)
        events = engine.generate(request)
        try:
            async for event in events:
                if event.token_ids:
                    arrivals[i].append(time.perf_counter())
                if stop.is_set():
                    return
        finally:
            await events.aclose()

    try:
        running = [asyncio.ensure_future(keep_decoding(i)) for i in range(len(short_prompts))]
        while any(len(a) < 8 for a in arrivals):  # every stream decoding at its steady pace
            await asyncio.sleep(0.005)
        start = time.perf_counter()
        await engine.complete(GenerationRequest(long_prompt, 1, use_memory=False, ignore_eos=True))
        first = time.perf_counter()
        await asyncio.sleep(0.05)  # the gap that ends after the prompt's last share
        stop.set()
        await asyncio.gather(*running)
    finally:
        await engine.close()
    stall = max(b - a for times in arrivals for a, b in zip(times, times[1:], strict=False)
                if b > start and a < first)
    return stall, first - start
