"""The serving engine on a GPU: its decode passes replayed from CUDA graphs, against eager passes.

`bench/gpu.py` times `StaticDecoder`, one fixed batch. Production serves through the
continuous-batching engine (`services/decoder/engine.py`), whose decode passes
`model/decode_graphs.py` pads to a few shapes and replays from CUDA graphs. Here that engine
generates with memory at each batch size: every prompt chunk and every decode-time chunk retrieves
5 memories, never reused within a round, handed over from host memory by an in-process retrieval
behind the production `CoalescingRetrieval`. It runs once with graphs and once without (two engines
cannot share the model's caches, so the arms run one after the other, not interleaved): tok/s is
batch * new tokens over a round's wall time (prompts read in one pass, sampling and streaming
included), the first round dropped, medians. On a CPU the "graphs" arm runs the padded passes
eagerly (`EngineConfig(cuda_graphs=True)`), which checks the logic, not the speed.

Imported by `bench/gpu.py` only when it runs, so that a machine without the services' dependencies
still runs the rest of the bench (and reports why this part did not).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence

from memory3.model.memory import ExplicitMemory
from memory3.model.model import Transformer
from memory3.model.tokenizer import TextCodec
from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationRequest
from memory3.services.decoder.retrieval import CoalescingRetrieval, RetrievedReference


class _BankRetrieval:
    """Each query's memories are the bank's next ones, so none repeats before the bank is used up."""

    def __init__(self, bank: Sequence[ExplicitMemory]) -> None:
        self.bank, self.next = bank, 0

    async def retrieve(self, queries, top_k, include_text):
        out = []
        for _ in queries:
            out.append([RetrievedReference(str((self.next + j) % len(self.bank)), 1.0) for j in range(top_k)])
            self.next += top_k
        return out

    async def fetch(self, ids):
        return [self.bank[int(i)] for i in ids]


def engine_throughput(model: Transformer, codec: TextCodec, bank: Sequence[ExplicitMemory],
                      prompts_by_batch: dict[int, list[list[int]]], *, new_tokens: int, rounds: int,
                      min_rounds: int, deadline: float | None, log: Callable[[str], None],
                      after_arm: Callable[[], None] = lambda: None) -> dict:
    """Per batch size, each arm's tok/s and start-up time, and `graphs_over_eager`. An arm that fails
    (out of memory, say) says why and the others go on; one whose share of the time left is shorter
    than the last arm took is skipped, so that the checks after it keep their time."""
    out: dict = {}
    arms = [(bsz, graphs) for bsz in prompts_by_batch for graphs in (True, False)]
    last_took = 0.0
    for i, (bsz, graphs) in enumerate(arms):
        name = "graphs" if graphs else "eager"
        started = time.perf_counter()
        share = None if deadline is None else started + (deadline - started) / (len(arms) - i)
        if share is not None and started + last_took > share:
            out.setdefault(str(bsz), {})[name] = {"skipped": "the time budget"}
            log(f"engine, batch {bsz}, cuda_graphs={graphs}: skipped, no time left in the budget")
            continue
        try:
            arm = asyncio.run(_rounds(model, codec, bank, prompts_by_batch[bsz], new_tokens, graphs, rounds,
                                      min_rounds, share))
        except Exception as exc:  # noqa: BLE001 - reported in the JSON, the other arms go on
            arm = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            log(f"engine, batch {bsz}, cuda_graphs={graphs}: failed: {arm['error']}")
        else:
            log(f"engine, batch {bsz}, cuda_graphs={graphs}: {arm['tok_s']} tok/s ({arm['rounds_run']} rounds; "
                f"started in {arm['start_s']} s, {arm['graphs_captured']} graphs captured)")
        finally:
            after_arm()
        last_took = time.perf_counter() - started
        out.setdefault(str(bsz), {})[name] = arm
    for arms_of in out.values():
        a, b = (arms_of.get(name, {}).get("tok_s") for name in ("graphs", "eager"))
        arms_of["graphs_over_eager"] = round(a / b, 4) if a and b else None
    return out


async def _rounds(model: Transformer, codec: TextCodec, bank: Sequence[ExplicitMemory], prompts: list[list[int]],
                  new_tokens: int, graphs: bool, rounds: int, min_rounds: int, deadline: float | None) -> dict:
    prefix_len = len(codec.reference_prefix(model.config))
    config = EngineConfig(max_batch=len(prompts), max_waiting=len(prompts), prefill_tokens=0, cuda_graphs=graphs,
                          max_seq_len=prefix_len + max(map(len, prompts)) + new_tokens + 1)
    engine = GenerationEngine(model, codec, CoalescingRetrieval(_BankRetrieval(bank)), config, release="bench")
    start = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - start
    seconds: list[float] = []
    try:
        for r in range(rounds):
            if r >= min_rounds and deadline is not None and time.perf_counter() + seconds[-1] > deadline:
                break
            start = time.perf_counter()
            counts = await asyncio.gather(*(_generated(engine, GenerationRequest(p, new_tokens, ignore_eos=True))
                                            for p in prompts))
            seconds.append(time.perf_counter() - start)
            if counts != [new_tokens] * len(prompts):
                raise RuntimeError(f"the engine generated {counts} tokens where {new_tokens} each were asked for")
        passes = engine.scheduler.passes
        captured, error = len(passes.graphs), passes.error
    finally:
        await engine.close()
    timed = seconds[1:]
    return {"tok_s": round(len(prompts) * new_tokens / statistics.median(timed), 1) if timed else None,
            "seconds": [round(s, 4) for s in seconds], "rounds_run": len(seconds), "start_s": round(start_s, 2),
            "graphs_captured": captured, "capture_error": error}


async def _generated(engine: GenerationEngine, request: GenerationRequest) -> int:
    return sum([len(event.token_ids) async for event in engine.generate(request)])
