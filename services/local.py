"""In-process generation on a checkpoint, without servers.

Used by `memory3 generate --checkpoint`. References given on the command line are encoded into
explicit memories in-process, and every chunk retrieves up to `mems_per_chunk` of them by token
overlap, a stand-in for the text service's embedding index when no index exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from memory3.model.checkpoint import load_checkpoint, load_tokenizer
from memory3.model.encoder import encode_references
from memory3.model.generate import SamplingParams, iter_generate
from memory3.model.memory import ExplicitMemory
from memory3.model.tokenizer import TextCodec

from .decoder.detokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class StreamEvent:
    text: str  # new text since the previous event (valid UTF-8, never a split character)
    token_ids: list[int]
    citations: list[int] | None = None  # reference indices a new chunk retrieved
    finish_reason: str | None = None


class OverlapRetriever:
    """Ranks references by the share of a query's distinct tokens they contain."""

    def __init__(self, references: Sequence[Sequence[int]], memories: Sequence[ExplicitMemory], limit: int) -> None:
        self.token_sets = [set(r) for r in references]
        self.memories = list(memories)
        self.limit = limit
        self.last_hits: list[list[int]] = []

    def search(self, query: Sequence[int]) -> list[int]:
        q = set(query)
        if not q:
            return []
        scored = [(len(q & refs) / len(q), i) for i, refs in enumerate(self.token_sets)]
        scored = [(s, i) for s, i in scored if s > 0]
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [i for _, i in scored[: self.limit]]

    def __call__(self, queries: list[list[int]]) -> list[list[ExplicitMemory]]:
        self.last_hits = [self.search(q) for q in queries]
        return [[self.memories[i] for i in hits] for hits in self.last_hits]


class LocalGenerator:
    def __init__(self, checkpoint: str | Path, *, device: str = "cpu") -> None:
        self.model = load_checkpoint(checkpoint, device=device)
        self.codec = TextCodec(load_tokenizer(checkpoint))
        if self.codec.vocab_size > self.model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.codec.vocab_size} tokens but the model only {self.model.config.vocab_size}"
            )
        self.prefix = self.codec.reference_prefix(self.model.config)

    def split_reference(self, text: str) -> list[list[int]]:
        """A document becomes one or more references of at most ref_len tokens."""
        ids = self.codec.encode(text)
        n = self.model.config.ref_len
        return [ids[i : i + n] for i in range(0, len(ids), n)] or []

    @torch.inference_mode()
    def stream(
        self,
        prompt: str,
        *,
        references: Sequence[str] = (),
        max_new_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
    ) -> Iterator[StreamEvent]:
        config = self.model.config
        sampling = dataclasses.replace(sampling, vocab_limit=self.codec.vocab_size)
        body = self.codec.body(prompt)
        ref_tokens = [chunk for text in references for chunk in self.split_reference(text)]
        prefix = self.prefix if ref_tokens else []  # the context starts with it only when memories are read
        if len(prefix) + len(body) + max_new_tokens > config.max_seq_len:
            with_prefix = f" + {len(prefix)} of the reference prefix" if prefix else ""
            raise ValueError(
                f"prompt of {len(body)} tokens{with_prefix} + {max_new_tokens} new tokens exceeds "
                f"max_seq_len={config.max_seq_len}"
            )
        retriever = None
        if ref_tokens:
            retriever = OverlapRetriever(ref_tokens, encode_references(self.model, ref_tokens, self.prefix),
                                         config.mems_per_chunk)
        detok = IncrementalDetokenizer(self.codec.decode)
        seen_queries = 0
        retrievals: list[list[list[int]]] = []
        steps = iter_generate(
            self.model, [body], prefix=prefix, max_new_tokens=max_new_tokens,
            sampling=sampling, stop_tokens=[self.codec.eos_id], memory_provider=retriever, retrievals=retrievals,
        )
        for token, finished in steps:
            citations = None
            if retriever is not None and len(retrievals[0]) > seen_queries:
                seen_queries = len(retrievals[0])
                citations = sorted({i for hits in retriever.last_hits for i in hits})
            tok = int(token[0])
            done = bool(finished[0])
            delta = detok.add([] if done else [tok], final=done)
            yield StreamEvent(delta, [tok], citations, "stop" if done else None)
            if done:
                return
        yield StreamEvent(detok.add([], final=True), [], None, "length")
