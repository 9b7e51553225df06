"""What a request's sampling options cost a decode step, penalties with a logit bias and logprobs,
and what scoring a prompt costs its prefill.

Each round runs every arm once, in an order that rotates, on one model in one process: `rows` streams
decode `new_tokens` tokens each (no memory, to the end), all with the arm's options, and the round
records the median interval between two tokens of a stream, one decode step of the batch. Reported
are each arm's median step and, per round, its ratio to the same batch sampling greedily with no
options, so that arms compare like with like on a shared machine. In the same rounds, a prompt of
`prompt_tokens` is read alone, once plainly (to its first token) and once scored (`prompt_logprobs`,
every position's logits, nothing generated): the ratio is what scoring adds to a prefill.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time

import torch

from memory3.model.config import Memory3Config
from memory3.model.generate import SamplingParams
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer
from memory3.services.decoder.engine import MAX_LOGPROBS, EngineConfig, GenerationEngine, GenerationRequest

from .closed_loop import median_interval
from .machine import machine_info

BIASED_IDS = 300  # the most a request may bias
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.5}


def arms(vocab: int) -> dict[str, dict]:
    """Each arm's request options: sampling parameters and logprobs."""
    bias = tuple((i, 1.0) for i in range(3, 3 + min(BIASED_IDS, vocab - 3)))
    penalized = SamplingParams(**PENALTIES, logit_bias=bias)
    return {"plain": {}, "penalties": {"sampling": penalized}, "logprobs_5": {"logprobs": 5},
            f"logprobs_{MAX_LOGPROBS}": {"logprobs": MAX_LOGPROBS},
            "all": {"sampling": penalized, "logprobs": MAX_LOGPROBS}}


def run_sampling_bench(*, preset: str, rows: int, new_tokens: int, rounds: int, prompt_tokens: int = 768,
                       seed: int = 0, log=lambda _msg: None) -> dict:
    config = Memory3Config.from_name(preset)
    model = random_model(config, seed=seed)
    codec = TextCodec(byte_level_tokenizer())
    options = arms(codec.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    prompts = [[codec.bos_id, *torch.randint(3, codec.vocab_size, (31,), generator=gen).tolist()] for _ in range(rows)]
    long = [codec.bos_id, *torch.randint(3, codec.vocab_size, (prompt_tokens - 1,), generator=gen).tolist()]
    steps: dict[str, list[float]] = {arm: [] for arm in options}
    reads: dict[str, list[float]] = {"plain": [], "scored": []}
    names = list(options)
    for r in range(rounds + 1):  # round 0 warms up
        for arm in names[r % len(names):] + names[:r % len(names)]:
            step = asyncio.run(_one_round(model, codec, prompts, new_tokens, options[arm]))
            if r:
                steps[arm].append(step)
        for kind in (["plain", "scored"] if r % 2 else ["scored", "plain"]):
            took = asyncio.run(_read_prompt(model, codec, long, scored=kind == "scored"))
            if r:
                reads[kind].append(took)
        if r:
            log(f"round {r}/{rounds}: " + ", ".join(f"{a} {steps[a][-1] * 1e3:.2f} ms" for a in names)
                + f"; a {prompt_tokens}-token prompt read {reads['plain'][-1] * 1e3:.0f} ms, "
                  f"scored {reads['scored'][-1] * 1e3:.0f} ms")
    scoring = [s / p for s, p in zip(reads["scored"], reads["plain"], strict=True)]
    out = {"preset": preset, "rows": rows, "new_tokens": new_tokens, "rounds": rounds, "vocab": model.config.vocab_size,
           "biased_ids": len(options["penalties"]["sampling"].logit_bias), "machine": machine_info(), "arms": {},
           "prompt_tokens": prompt_tokens,
           "prompt_read_ms": round(statistics.median(reads["plain"]) * 1e3, 2),
           "prompt_scored_ms": round(statistics.median(reads["scored"]) * 1e3, 2),
           "scored_over_plain_read": round(statistics.median(scoring), 4),
           "scored_over_plain_read_ci90": median_interval(scoring)}
    for arm in names:
        ratios = [s / b for s, b in zip(steps[arm], steps["plain"], strict=True)]
        out["arms"][arm] = {"step_ms": round(statistics.median(steps[arm]) * 1e3, 3),
                            "step_over_plain": round(statistics.median(ratios), 4),
                            "step_over_plain_ci90": median_interval(ratios)}
    out["summary"] = {**{arm: {k: out["arms"][arm][k] for k in ("step_ms", "step_over_plain")} for arm in names},
                      "prompt_scoring": {k: out[k] for k in ("prompt_read_ms", "prompt_scored_ms",
                                                              "scored_over_plain_read")}}
    return out


async def _read_prompt(model, codec, prompt: list[int], *, scored: bool) -> float:
    """Seconds to read `prompt` alone: to its first token, or scored (every position's logits, nothing
    generated)."""
    engine = GenerationEngine(model, codec, None, EngineConfig(max_batch=1, max_waiting=0, prefill_tokens=0))
    await engine.start()
    try:
        request = GenerationRequest(prompt, 0 if scored else 1, use_memory=False, ignore_eos=True,
                                    prompt_logprobs=0 if scored else None)
        start = time.perf_counter()
        await engine.complete(request)
        return time.perf_counter() - start
    finally:
        await engine.close()


async def _one_round(model, codec, prompts: list[list[int]], new_tokens: int, options: dict) -> float:
    """The median interval between two tokens of a stream, with every stream decoding."""
    engine = GenerationEngine(model, codec, None, EngineConfig(max_batch=len(prompts), max_waiting=0))
    await engine.start()
    arrivals: list[list[float]] = [[] for _ in prompts]

    async def decode(i: int) -> None:
        request = dataclasses.replace(GenerationRequest(prompts[i], new_tokens, use_memory=False, ignore_eos=True),
                                      **options)
        async for event in engine.generate(request):
            if event.token_ids:
                arrivals[i].append(time.perf_counter())

    try:
        await asyncio.gather(*(decode(i) for i in range(len(prompts))))
    finally:
        await engine.close()
    # The first few intervals include the other streams' prefill: only the steady ones count.
    return statistics.median(b - a for times in arrivals for a, b in zip(times[8:], times[9:], strict=False))
