"""Exact-match question answering, with no memory, with explicit memory, or with RAG.

All three modes use the same model and the same retrieved references:
  none    the question alone;
  memory  the question's chunk reads the references' explicit memories;
  rag     the references' text is prepended to the question (no memory).
An answer is correct when the generated text up to the first newline, stripped, equals the
expected answer exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from memory3.model.encoder import encode_references
from memory3.model.generate import SamplingParams, generate
from memory3.model.memory import ExplicitMemory
from memory3.model.model import Transformer
from memory3.model.tokenizer import TextCodec

MODES = ("none", "memory", "rag")


@dataclass(frozen=True)
class Question:
    prompt: str  # ends with "Answer: <cue>" (world.qa_prompt)
    answer: str
    entity_id: str | None = None  # the world entity the question is about, when it is one


# Query texts -> per query, the retrieved reference ids (best first).
Retriever = Callable[[list[str]], list[list[str]]]
# Reference ids -> memories (from a memory bank, or encoded on the fly).
MemoryLookup = Callable[[Sequence[str]], list[ExplicitMemory]]


def encode_on_the_fly(model: Transformer, codec: TextCodec, texts: dict[str, str]) -> MemoryLookup:
    prefix = codec.reference_prefix(model.config)

    def lookup(ids: Sequence[str]) -> list[ExplicitMemory]:
        if not ids:
            return []
        tokens = [codec.encode(texts[i])[: model.config.ref_len] for i in ids]
        with torch.no_grad():
            return encode_references(model, tokens, prefix)

    return lookup


def answer_questions(
    model: Transformer, codec: TextCodec, questions: Sequence[Question], mode: str, *,
    retrieve: Retriever, reference_text: dict[str, str], memory_lookup: MemoryLookup | None = None,
    batch_size: int = 32, max_new_tokens: int = 16,
) -> list[str]:
    """Generated answers (text before the first newline, stripped).

    Memory mode retrieves for every 64-token chunk with that chunk's text (as serving does);
    RAG retrieves once with the question, as the paper's RAG baselines do.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    config = model.config
    newline = codec.encode("\n")
    sampling = SamplingParams(vocab_limit=codec.vocab_size)
    lookup = memory_lookup or encode_on_the_fly(model, codec, reference_text)

    def provider(queries: list[list[int]]) -> list[list[ExplicitMemory]]:
        found = retrieve([codec.decode(q) for q in queries])
        return [lookup(ids[: config.mems_per_chunk]) for ids in found]

    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        part = questions[start : start + batch_size]
        kwargs = {}
        if mode == "rag":
            found = retrieve([q.prompt for q in part])
            bodies = [codec.body("\n".join(reference_text[r] for r in ids[: config.mems_per_chunk]) + "\n" + q.prompt)
                      for q, ids in zip(part, found, strict=True)]
        else:
            bodies = [codec.body(q.prompt) for q in part]
        if mode == "memory":
            kwargs = {"prefix": codec.reference_prefix(config), "memory_provider": provider}
        with torch.no_grad():
            out = generate(model, bodies, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_tokens=newline[:1], **kwargs)
        answers.extend(codec.decode(tokens).split("\n")[0].strip() for tokens in out.tokens)
    return answers


def accuracy(answers: Sequence[str], questions: Sequence[Question]) -> float:
    if not questions:
        return 0.0
    return sum(a == q.answer for a, q in zip(answers, questions, strict=True)) / len(questions)


def first_token_accuracy(codec: TextCodec, answers: Sequence[str], questions: Sequence[Question]) -> float:
    """Share of generated answers whose first token is the expected answer's first token.

    A graded view of what exact match shows only once whole values come out right: while a model
    is learning to read its memories, this rises first. Scored on the answers `answer_questions`
    already generated, by tokenizing each after its prompt as training does.
    """
    if not questions:
        return 0.0
    hits = 0
    for answer, q in zip(answers, questions, strict=True):
        n_prompt = len(codec.encode(q.prompt))
        expected = codec.encode(f"{q.prompt} {q.answer}")[n_prompt]
        got = codec.encode(f"{q.prompt} {answer}")[n_prompt:]
        hits += bool(answer) and got[0] == expected
    return hits / len(questions)
