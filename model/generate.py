"""Generation as small functions: sample -> prefill -> decode_one_token -> generate.

Retrieval is the caller's: a `MemoryProvider` maps query token lists to memories. The prompt's
chunks are all retrieved before prefill, and the whole prompt is prefilled in one pass with a
chunk->memory mask. While decoding, the first generated chunk keeps the memories of the last
prompt chunk (paper §7.5); after every `chunk_len` generated tokens, those tokens are the query
for the next set, which replaces the resident memories in the KV cache. With `query_lead` = L > 0
the query is instead the `chunk_len` tokens that end L tokens before the chunk boundary: the
serving engine retrieves that early so that retrieval overlaps L decode steps (engine.py).

Streaming, continuous batching and cancellation belong to the serving engine; this module
serves one static batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import Memory3Config
from .layout import chunk_groups, chunk_spans, rope_positions
from .memory import ExplicitMemory, stack_memories
from .model import Transformer

# Query token lists -> the memories each query retrieved (at most mems_per_chunk each).
MemoryProvider = Callable[[list[list[int]]], list[list[ExplicitMemory]]]
# Temperatures below this sample as greedy: dividing logits by a subnormal overflows them to inf.
MIN_TEMPERATURE = 1e-5
# OpenAI's ranges for its penalties and logit biases.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters.

    vocab_limit: sample only ids below it, for a model whose embedding is padded past the
    tokenizer's vocabulary (the paper pads 60,299 tokens to 60,416); None samples any id.
    presence_penalty, frequency_penalty and logit_bias are OpenAI's (`penalize`); they apply
    before temperature and the filters, to greedy decoding too.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    vocab_limit: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # 1/t overflows: as good as greedy
            object.__setattr__(self, "temperature", 0.0)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise ValueError(f"vocab_limit must be >= 1, got {self.vocab_limit}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise ValueError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
        if len({token for token, _ in self.logit_bias}) < len(self.logit_bias):
            raise ValueError("logit_bias: a token id is given twice")
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias: token ids are integers >= 0, got {token!r}")
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise ValueError(f"logit_bias: a bias is in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], "
                                 f"got {bias} for token {token}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop token) or "length"
    retrievals: list[list[list[int]]] = field(default_factory=list)  # per sequence: queries made


def logit_bias_row(params: SamplingParams, vocab: int, device: torch.device | str = "cpu") -> Tensor:
    """A request's `logit_bias` as a dense (vocab,) row, to add to its logits each step."""
    row = torch.zeros(vocab, device=device)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias, strict=True)
        if max(ids) >= vocab:
            raise ValueError(f"logit_bias: token id {max(ids)} is outside the model's {vocab} ids")
        row[list(ids)] = torch.tensor(biases, device=device)
    return row


def penalize(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor, bias: Tensor | None = None) -> Tensor:
    """OpenAI's adjustments, before temperature and the filters: an id's logit loses `frequency` for
    every time it was generated and `presence` once if it was at all, and gains its `bias`.

    logits, counts (how often each id was generated so far), bias: (B, V); presence, frequency: (B,).
    Returns new (B, V) float32 logits. The penalties count the generated tokens only, not the
    prompt's, as OpenAI describes them and vLLM applies them; a batch of streams with settings of
    their own is adjusted in a few whole-batch operations, however many streams it holds.
    """
    out = logits.float() - counts * frequency[:, None] - (counts > 0) * presence[:, None]
    return out + bias if bias is not None else out


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B,) token ids."""
    if params.vocab_limit is not None and params.vocab_limit < logits.shape[-1]:
        logits = logits[:, : params.vocab_limit]  # ids are positions, so slicing keeps them
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p.
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(
    model: Transformer,
    tokens: Tensor,
    slots: Tensor,
    positions: Tensor,
    last: Tensor,
    memory=None,
    token_group: Tensor | None = None,
) -> Tensor:
    """One pass over the (right-padded) prompts; fills the caches. Returns the (B, V) logits of
    each prompt's last token, at index `last` (B,)."""
    return model(tokens, positions, memory=memory, token_group=token_group, cache_slots=slots, logits_at=last)[:, 0]


def decode_one_token(model: Transformer, tokens: Tensor, slots: Tensor, positions: Tensor) -> Tensor:
    """tokens, slots, positions: (B, 1) -> (B, V) logits; reads the caches' resident memories."""
    return model(tokens, positions, cache_slots=slots)[:, -1]


def iter_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    prefix: Sequence[int] = (),
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_tokens: Sequence[int] = (),
    min_new_tokens: int = 0,
    memory_provider: MemoryProvider | None = None,
    retrievals: list[list[list[int]]] | None = None,
    query_lead: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) once per generated position.

    Args:
        prompts: body token ids per sequence, each starting with the ordinary `<s>`.
        prefix: the tokenized reference prefix (`<s>Reference:`); empty for a plain Llama layout.
        memory_provider: retrieval; None generates without memory (caches without memory slots).
        retrievals: when given, receives the queries made per sequence.
        min_new_tokens: no stop token is drawn before this many tokens (vLLM's `min_tokens`).
        query_lead: L; a generated chunk's query is the `chunk_len` tokens (prompt after its `<s>`,
            then generated) ending L tokens before the chunk starts. 0: the previous chunk exactly.
    """
    config = model.config
    if not 0 <= query_lead < config.chunk_len:
        raise ValueError(f"query_lead must be in 0..{config.chunk_len - 1}, got {query_lead}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in 0..max_new_tokens ({max_new_tokens}), got {min_new_tokens}")
    if memory_provider is not None and not prefix:
        raise ValueError("generation with memory needs the reference prefix tokens")
    config.check_token_ids(prompts, "prompt")
    config.check_token_ids([prefix, stop_tokens], "prefix or stop token")
    if model.has_cache:  # it would replace them under the generation (or decoder) that holds them
        raise ValueError("this model's caches are held by another generation or a decoder: run one at a time "
                         "(finish or close the other), or generate with another copy of the model")
    device = model.output.weight.device
    bsz, p = len(prompts), len(prefix)
    lengths = torch.tensor([len(x) for x in prompts], device=device)
    width = p + int(lengths.max())
    max_len = width + max_new_tokens
    if max_len > config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {max_len} tokens exceeds max_seq_len={config.max_seq_len}")
    log = retrievals if retrievals is not None else []
    log[:] = [[] for _ in range(bsz)]

    # The prefix's K/V are written once for all rows (Transformer.write_prefix); prefill runs on
    # the right-padded bodies, at slots p, p+1, ...
    tokens = torch.zeros(bsz, width - p, dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        tokens[b, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long, device=device)
    slots = p + torch.arange(width - p, device=device)[None].expand(bsz, -1)  # (B, T_body)
    positions = rope_positions(slots, p, config.ref_len)

    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    model.setup_caches(bsz, max_len, memory=memory_provider is not None)
    try:
        memory = token_group = None
        if memory_provider is not None:
            queries = [[list(prompt[s:e]) for s, e in chunk_spans(len(prompt), config.chunk_len)] for prompt in prompts]
            flat = [q for per_seq in queries for q in per_seq]
            found = retrieve_memories(memory_provider, flat, config)
            groups, i = [], 0
            for b, per_seq in enumerate(queries):
                groups.append(found[i : i + len(per_seq)])
                log[b].extend(per_seq)
                i += len(per_seq)
            if any(mems for per_seq in groups for mems in per_seq):
                memory = stack_memories(groups, slots_per_group=config.mem_slots, device=device,
                                        dtype=model_dtype(model))
                token_group = chunk_groups(slots, p, config.chunk_len)
        if p:
            model.write_prefix(torch.as_tensor(list(prefix), dtype=torch.long, device=device))
        last = prefill(model, tokens, slots, positions, lengths - 1, memory, token_group)  # (B, V)
        # The first generated chunk keeps the last prompt chunk's memories: rows whose last chunk
        # retrieved none (an earlier one did) start decoding without.
        kept = [b for b, g in enumerate(groups) if g[-1]] if memory is not None else []
        if kept:
            model.set_resident_memory(
                stack_memories([[groups[b][-1]] for b in kept], slots_per_group=config.mem_slots,
                               device=device, dtype=model_dtype(model)),
                rows=torch.as_tensor(kept, device=device),
            )

        stop = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        history: list[Tensor] = []
        if sampling.adjusts_logits:
            vocab = last.shape[-1]
            counts = torch.zeros(bsz, vocab, device=device)  # (B, V): how often each id was generated
            presence = torch.full((bsz,), sampling.presence_penalty, device=device)
            frequency = torch.full((bsz,), sampling.frequency_penalty, device=device)
            bias = logit_bias_row(sampling, vocab, device)[None] if sampling.logit_bias else None  # (1, V)
        for step in range(max_new_tokens):
            if sampling.adjusts_logits:
                last = penalize(last, counts, presence, frequency, bias)
            if step < min_new_tokens and len(stop):
                last = last.float().index_fill(1, stop, float("-inf"))
            next_token = sample(last, sampling, generator)  # (B,)
            if sampling.adjusts_logits:
                counts.scatter_add_(1, next_token[:, None], torch.ones(bsz, 1, device=device))
            finished = finished | torch.isin(next_token, stop)
            history.append(next_token)
            yield next_token, finished.clone()
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if memory_provider is not None and step > 0 and step % config.chunk_len == 0:
                _swap_memories(model, memory_provider, prompts, history, finished, log, query_lead)
            slot = (p + lengths + step)[:, None]  # (B, 1)
            last = decode_one_token(model, next_token[:, None], slot, rope_positions(slot, p, config.ref_len))
    finally:
        model.clear_caches()


def generate(model: Transformer, prompts: Sequence[Sequence[int]], **kwargs) -> GenerationOutput:
    """Run `iter_generate` to the end; tokens after a sequence's stop token are dropped."""
    retrievals: list[list[list[int]]] = []
    out: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    for step_tokens, finished in iter_generate(model, prompts, retrievals=retrievals, **kwargs):
        for b, tok in enumerate(step_tokens.tolist()):
            if reasons[b] == "length":
                out[b].append(tok)
                if finished[b]:
                    reasons[b] = "stop"
    return GenerationOutput(out, reasons, retrievals)


def query_window(body: Sequence[int], generated: Sequence[int], chunk_len: int, lead: int) -> list[int]:
    """The query for the chunk after `generated`: the last `chunk_len` tokens known `lead` tokens
    before it starts, out of the body (after its `<s>`) and the generated tokens."""
    known = [*body[1:], *generated]
    end = max(0, len(known) - lead)
    return known[max(0, end - chunk_len) : end]


def model_dtype(model: Transformer) -> torch.dtype:
    return model.output.weight.dtype


def retrieve_memories(provider: MemoryProvider, queries: list[list[int]],
                      config: Memory3Config) -> list[list[ExplicitMemory]]:
    """The provider's memories for each query, at most `mems_per_chunk`, each of this model's shape
    (a bank encoded by another model would otherwise run with another sparsity, or fail far away)."""
    found = provider(queries)
    if len(found) != len(queries):
        raise ValueError(f"memory provider returned {len(found)} results for {len(queries)} queries")
    kept = [list(mems)[: config.mems_per_chunk] for mems in found]
    for mems in kept:
        for memory in mems:
            if memory.shape != config.memory_shape:
                raise ValueError(f"a memory of shape {tuple(memory.shape)} does not fit this model, which reads "
                                 f"{config.memory_shape} (memory layers, KV heads, tokens per head, head dim): "
                                 "was it encoded by another model?")
    return kept


def _swap_memories(model, provider, prompts, history, finished, log, lead: int) -> None:
    """Retrieve with the last chunk of tokens (`lead` tokens back) of each unfinished sequence."""
    chunk_len = model.config.chunk_len
    # history[-1] is the token about to be fed: it is the first one to read the new memories.
    generated = torch.stack(history[:-1], dim=1).tolist()  # (B, tokens generated before it)
    rows = [b for b in range(len(generated)) if not finished[b]]
    if not rows:
        return
    recent = {b: query_window(prompts[b], generated[b], chunk_len, lead) for b in rows}
    found = retrieve_memories(provider, [recent[b] for b in rows], model.config)
    for b in rows:
        log[b].append(recent[b])
    device = model.output.weight.device
    row_index = torch.as_tensor(rows, device=device)
    has_memory = [i for i, mems in enumerate(found) if mems]
    model.clear_resident_memory(row_index)
    if has_memory:
        model.set_resident_memory(
            stack_memories([[found[i]] for i in has_memory], slots_per_group=model.config.mem_slots,
                           device=device, dtype=model_dtype(model)),
            rows=row_index[has_memory],
        )
