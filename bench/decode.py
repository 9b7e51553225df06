"""Decode-speed benchmark: the paper's protocol (Table 21) scaled to a CPU.

A batch of sequences, `prompt_tokens` in and `new_tokens` out, one retrieval per 64-token
chunk (2 for the prompt, 1 while decoding at 128/128), 5 memories each. Three variants of the
same model and engine, timed interleaved in one run:
  no_memory  plain decoding, caches without memory slots;
  memory     explicit memory: every retrieval returns 5 memories never used before (the paper's
             worst case: no cache reuse), supplied from process memory as if fetched;
  rag        no memory; the 5 references of the first chunk (5 x ref_len tokens) are prefilled
             as text in front of the prompt (the paper's RAG baseline retrieves once).
Throughput is batch * new_tokens / time, prefill included. The three variants run in lockstep,
each on its own copy of the weights: one generation step of each in turn (the first step is the
whole prefill), in an order that rotates every round, and each variant's time is the sum of its
own steps. The machine's speed drifts by 10% or more within a second on a shared VM; lockstep
makes the three runs of a round see the same drift, so their ratios compare like with like.
Summary ratios are the medians of the per-round ratios, throughputs the medians of each
variant's runs; the spread of the per-round ratios is reported beside them.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from memory3.model.config import Memory3Config
from memory3.model.encoder import encode_references
from memory3.model.generate import iter_generate
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer

from .machine import machine_info


class UniqueMemoryBank:
    """Hands out each memory once, cycling when the bank runs out."""

    def __init__(self, memories, per_query: int) -> None:
        self.memories, self.per_query, self.next = memories, per_query, 0

    def __call__(self, queries):
        out = []
        for _ in queries:
            out.append([self.memories[(self.next + j) % len(self.memories)] for j in range(self.per_query)])
            self.next += self.per_query
        return out


def run_decode_bench(
    *, preset: str = "small", batch: int = 8, prompt_tokens: int = 128, new_tokens: int = 128,
    repeats: int = 3, threads: int | None = None, seed: int = 0,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    config = Memory3Config.from_name(preset)
    model = random_model(config, seed=seed)
    codec = TextCodec(byte_level_tokenizer())
    prefix = codec.reference_prefix(config)
    gen = torch.Generator().manual_seed(seed)
    vocab = codec.vocab_size

    def random_tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    prompts = [[codec.bos_id, *random_tokens(prompt_tokens - 1)] for _ in range(batch)]
    retrievals_per_seq = len(range(0, prompt_tokens, config.chunk_len)) + (new_tokens - 1) // config.chunk_len
    n_refs = batch * retrievals_per_seq * config.mems_per_chunk
    references = [random_tokens(config.ref_len) for _ in range(n_refs)]
    with torch.inference_mode():
        bank = encode_references(model, references, prefix)
    rag_context = [tok for ref in references[: config.mems_per_chunk] for tok in ref]
    rag_prompts = [[codec.bos_id, *rag_context, *p[1:]] for p in prompts]

    models = {name: copy.deepcopy(model) for name in ("no_memory", "memory", "rag")}  # one cache set each
    variants: dict[str, Callable[[], Iterator]] = {
        "no_memory": lambda: iter_generate(models["no_memory"], prompts, max_new_tokens=new_tokens),
        "memory": lambda: iter_generate(models["memory"], prompts, prefix=prefix, max_new_tokens=new_tokens,
                                        memory_provider=UniqueMemoryBank(bank, config.mems_per_chunk)),
        "rag": lambda: iter_generate(models["rag"], rag_prompts, max_new_tokens=new_tokens),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with torch.inference_mode():
        _lockstep(variants, names, new_tokens)  # warm-up, untimed
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name, seconds in _lockstep(variants, names[shift:] + names[:shift], new_tokens).items():
                times[name].append(seconds)
    tok_s = {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}
    best = {name: batch * new_tokens / min(t) for name, t in times.items()}
    # A throughput ratio is the inverse ratio of the wall times of the same round.
    paired = {
        "memory_over_no_memory": [n / m for m, n in zip(times["memory"], times["no_memory"], strict=True)],
        "memory_over_rag": [r / m for m, r in zip(times["memory"], times["rag"], strict=True)],
    }
    summary = {
        "no_memory_tok_s": round(tok_s["no_memory"], 2),
        "memory_tok_s": round(tok_s["memory"], 2),
        "rag_tok_s": round(tok_s["rag"], 2),
        **{key: round(statistics.median(ratios), 4) for key, ratios in paired.items()},
    }
    return {
        "benchmark": "decode",
        "summary": summary,
        **summary,
        "protocol": {
            "preset": preset, "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "retrievals_per_sequence": retrievals_per_seq, "memories_per_retrieval": config.mems_per_chunk,
            "rag_prefill_tokens": len(rag_context), "repeats": repeats,
            "statistic": "variants in lockstep (one step each in turn); ratios: median of per-round paired ratios; "
                         "throughputs: median per variant",
            "weights": "random init (speed does not depend on the weights)",
        },
        "fastest_runs": {
            "memory_over_no_memory": round(best["memory"] / best["no_memory"], 4),
            "memory_over_rag": round(best["memory"] / best["rag"], 4),
        },
        "per_round_ratios": {key: [round(r, 4) for r in ratios] for key, ratios in paired.items()},
        "seconds": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "machine": machine_info(),
    }


def _lockstep(variants: dict[str, Callable[[], Iterator]], order: list[str], new_tokens: int) -> dict[str, float]:
    """Run the variants one generation step each in turn; seconds spent in each variant's steps."""
    running = {name: variants[name]() for name in order}
    seconds = dict.fromkeys(order, 0.0)
    steps = dict.fromkeys(order, 0)
    while running:
        for name in [n for n in order if n in running]:
            start = time.perf_counter()
            try:
                next(running[name])
            except StopIteration:
                del running[name]
                continue
            finally:
                seconds[name] += time.perf_counter() - start
            steps[name] += 1
    for name, n in steps.items():
        if n != new_tokens:
            raise RuntimeError(f"{name} generated {n} positions, expected {new_tokens}")
    return seconds
