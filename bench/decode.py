"""Decode-speed benchmark: the paper's protocol (Table 21) scaled to a CPU.

A batch of sequences, `prompt_tokens` in and `new_tokens` out, one retrieval per 64-token
chunk (2 for the prompt, 1 while decoding at 128/128), 5 memories each. Three variants of the
same model and engine, timed interleaved in one run:
  no_memory  plain decoding, caches without memory slots;
  memory     explicit memory: every retrieval returns 5 memories never used before (the paper's
             worst case: no cache reuse), supplied from process memory as if fetched;
  rag        no memory; the 5 references of the first chunk (5 x ref_len tokens) are prefilled
             as text in front of the prompt (the paper's RAG baseline retrieves once).
Throughput is batch * new_tokens / wall time, prefill included. Each round times the three
variants back to back, in an order that rotates from round to round, so a ratio compares runs
that saw the same machine load; the summary ratios are the medians of the per-round ratios, and
the throughputs the medians of each variant's runs. On a shared machine a variant's absolute
speed drifts by 10% or more between rounds, while the paired ratios move by a few percent; the
ratios of the fastest runs and the spread of the per-round ratios are reported beside them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from memory3.model.config import Memory3Config
from memory3.model.encoder import encode_references
from memory3.model.generate import generate
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

    variants: dict[str, Callable[[], object]] = {
        "no_memory": lambda: generate(model, prompts, max_new_tokens=new_tokens),
        "memory": lambda: generate(model, prompts, prefix=prefix, max_new_tokens=new_tokens,
                                   memory_provider=UniqueMemoryBank(bank, config.mems_per_chunk)),
        "rag": lambda: generate(model, rag_prompts, max_new_tokens=new_tokens),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for run in variants.values():  # warm-up, untimed
            run()
        names = list(variants)
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                run = variants[name]
                start = time.perf_counter()
                out = run()
                times[name].append(time.perf_counter() - start)
                produced = sum(len(t) for t in out.tokens)
                if produced != batch * new_tokens:
                    raise RuntimeError(f"{name} produced {produced} tokens, expected {batch * new_tokens}")
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
            "statistic": "ratios: median of per-round paired ratios; throughputs: median per variant",
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
