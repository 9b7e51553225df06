"""The decoder engine: continuous batching of many streams over one model, protocol-neutral.

Two sides meet here:
  - the asyncio side (`GenerationEngine.generate`) validates a request, retrieves and fetches
    the memories of the prompt's chunks, then hands the stream to the scheduler and relays
    its tokens as events (text deltas, citations, finish reason);
  - the scheduler thread owns the model and its caches. Between decode steps it admits ready
    streams into free cache rows, reads a share of their prompts (at most `prefill_tokens` a step,
    so a long prompt does not stall the running streams), frees the rows of finished or cancelled
    ones, and runs one decode step for every stream that is not waiting for memories or its prompt.

Every 64 generated tokens a stream needs new memories. Their query is the last 64 tokens known
`retrieval_lead_tokens` (L) tokens before the chunk boundary: as soon as that token is sampled,
the scheduler asks the asyncio side to retrieve and fetch them, while the stream decodes its last
L + 1 tokens of the chunk on the old memories. With L = 0 the query is exactly the chunk just
generated (as `model.generate` does by default), and retrieval has one decode step to answer;
retrieval plus fetch takes tens of milliseconds, several decode steps of a batch on a GPU or under
load, so the default L = 8 lets it overlap decoding instead of pausing the stream at every chunk.
If the memories have not arrived by the time the next chunk's first token is to be fed, that
stream alone pauses; the other streams keep decoding. A paused row below the batch's highest row
is fed a placeholder token at its next slot, which the real token overwrites when the stream
resumes, so the batch never waits.

The model runs in a thread so that gRPC I/O, retrieval and memory fetches proceed while it
computes (torch releases the GIL inside its kernels).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from memory3.model.decode_graphs import DecodePasses
from memory3.model.generate import SamplingParams, logit_bias_row, penalize, query_window, sample
from memory3.model.layout import chunk_spans
from memory3.model.memory import ExplicitMemory, stack_memories
from memory3.model.model import Transformer
from memory3.model.tokenizer import TextCodec

from ..rpc import metrics
from ..rpc.errors import DataLoss, DeadlineExceeded, InvalidInput, ResourceExhausted, ServiceError, Unavailable
from .detokenizer import IncrementalDetokenizer
from .retrieval import Retrieval, RetrievedReference

log = logging.getLogger("memory3.decoder")
NOT_STARTED_BY_DRAIN = ("the decoder is shutting down and had not started this request: retry it on another "
                        "replica")

RETRIEVAL_POLICIES = ("fail", "continue")
# A stream whose logits hold NaN or inf: INTERNAL, the decoder's fault, never the request's.
NON_FINITE_LOGITS = ("the model produced NaN or inf logits for this request (an overflow in its weights or "
                     "activations): it was stopped, and its cache row cleared")
# Most alternatives a request may ask to see the logprobs of, per generated token (OpenAI's chat limit).
MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64  # a request's `stop_token_ids`: each is looked for in every step's tokens
SCORED_PER_PIECE = 256  # prompt positions whose log-softmax is taken at once (`Scheduler._score_prompts`)
# Scheduler steps failing in a row that make the decoder not ready, for this long after the last one.
FAILING_STEPS = 3
FAILING_FOR_S = 30.0


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # streams decoded together (cache rows)
    max_waiting: int = 32  # accepted streams beyond max_batch; more are RESOURCE_EXHAUSTED
    max_seq_len: int | None = None  # cache length per row; None: the model's max_seq_len
    default_max_tokens: int = 128
    max_prompt_chars: int = 64 * 1024
    # Streams one client may have accepted at once (0: no limit); clients are told apart by
    # GenerationRequest.client_id, which the front end fills in (an x-client-id header, or the peer).
    max_streams_per_client: int = 0
    # Text or memory service unreachable: "fail" ends the request with UNAVAILABLE;
    # "continue" generates without memory and says so in the response's warnings.
    retrieval_policy: str = "fail"
    # A generated chunk's query ends this many tokens before the chunk: retrieval overlaps that
    # many decode steps (0: the query is the previous chunk exactly; below the model's chunk_len).
    retrieval_lead_tokens: int = 8
    # Most prompt-token rows one scheduler step's prefill computes, padding included (rounded down to
    # whole chunks of the model, at least one; 0: no limit). A longer prompt, or several joining at
    # once, is read over several steps with a decode step of the running streams between each, so
    # that their tokens keep coming.
    prefill_tokens: int = 2048
    # A scheduler whose loop has not gone round for this long is stuck (a hung device, a deadlock):
    # the decoder reports itself not live, so that it is restarted. Above the longest model pass the
    # server makes (a full batch's prefill, minutes on a CPU for a large model).
    stall_s: float = 600.0
    # Decode passes padded to a few batch and context sizes, each captured once in a CUDA graph when
    # the engine starts and replayed (`model/decode_graphs.py`); None: on a CUDA device. On a CPU,
    # True runs the padded passes eagerly.
    cuda_graphs: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_streams_per_client < 0:
            raise ValueError(f"max_streams_per_client must be >= 0 (0: no limit), got {self.max_streams_per_client}")
        if self.retrieval_lead_tokens < 0:
            raise ValueError(f"retrieval_lead_tokens must be >= 0, got {self.retrieval_lead_tokens}")
        if self.retrieval_policy not in RETRIEVAL_POLICIES:
            raise ValueError(f"retrieval_policy must be one of {RETRIEVAL_POLICIES}, got {self.retrieval_policy!r}")
        if self.prefill_tokens < 0:
            raise ValueError(f"prefill_tokens must be >= 0 (0: no limit), got {self.prefill_tokens}")
        if not self.stall_s > 0:
            raise ValueError(f"stall_s must be > 0 seconds, got {self.stall_s}")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]  # the body: starts with <s>
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    # Of `stop`, those that end the stream before `min_tokens` too: a chat template's turn end.
    stop_always: tuple[str, ...] = ()
    use_memory: bool = True
    include_reference_text: bool = False
    ignore_eos: bool = False
    request_id: str = ""
    deadline: float | None = None  # time.monotonic() deadline
    client_id: str = ""  # who asked, for the per-client stream limit ("": not counted)
    arrival: float | None = None  # time.monotonic() the request came in (None: when the engine gets it)
    # Report each generated token's logprob and those of this many most likely alternatives (0 to
    # MAX_LOGPROBS); None reports none.
    logprobs: int | None = None
    # The same for every prompt token after the first (`<s>`), given those before it: scoring a text.
    # With memory, each prompt chunk then reads the memories the chunk before it retrieved (`_prompt_memories`).
    # With it, max_tokens may be 0: the prompt is read and scored, and nothing generated.
    prompt_logprobs: int | None = None
    # vLLM's: the stream ends ("stop") when it draws one of these ids, which is kept in its token ids
    # but not in its text, as vLLM does by default; with `ignore_eos`, the end-of-sequence token too
    # when listed here.
    stop_token_ids: tuple[int, ...] = ()
    # vLLM's: the stream cannot end before it has this many tokens. Until then the end-of-sequence
    # token and `stop_token_ids` are never drawn, and stop strings (but `stop_always`) are looked for
    # only in the text after them. At most max_tokens.
    min_tokens: int = 0


@dataclass(frozen=True)
class Citation:
    chunk_index: int
    generated: bool
    references: list[RetrievedReference]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    retrievals: int
    memories_read: int


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely ids' (most likely
    first). They are the model's own, over the tokenizer's vocabulary: before penalties, logit
    biases, temperature and top-k/top-p, which shape only what is sampled (vLLM's default too)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    # token_id's among the vocabulary, as vLLM ranks it: the ids at least as likely, itself included;
    # reported for prompt tokens (`prompt_logprobs`) only, None otherwise.
    rank: int | None = None


@dataclass
class GenerationEvent:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when the request asks
    # On the first event, when the request asks: one per prompt token after `<s>`.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    citations: list[Citation] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last event
    usage: Usage | None = None
    warnings: list[str] = field(default_factory=list)


# ---- messages from the scheduler to a stream's consumer ----
@dataclass(frozen=True)
class _Tokens:
    ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    spelled: bool = True  # False: the ids go out without their text (a stop token id's)


@dataclass(frozen=True)
class _Finished:
    reason: str


@dataclass(frozen=True)
class _PromptLogprobs:
    items: list[TokenLogprob]


@dataclass(frozen=True)
class _Failed:
    error: ServiceError


@dataclass(frozen=True)
class _Retrieve:  # to the engine, not the consumer: retrieve for the stream's next chunk
    query: list[int]
    chunk_number: int
    needed_in_s: float  # when the stream will reach the chunk, at the recent pace of decoding


@dataclass(frozen=True)
class _Note:
    citation: Citation | None = None
    warning: str | None = None
    memories: int = 0


class _Stream:
    """A request's state inside the scheduler."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, prefix_len: int, groups: list[list[ExplicitMemory]],
                 loop: asyncio.AbstractEventLoop, out: asyncio.Queue, arrival: float,
                 device: torch.device = torch.device("cpu"), resident: list[ExplicitMemory] | None = None) -> None:
        self.id = next(self._ids)
        self.request, self.prefix_len, self.groups = request, prefix_len, groups
        # The first generated chunk's memories, when they are not the last prompt chunk's group (a scored
        # prompt's); None: that group's.
        self.resident = resident
        self.loop, self.out, self.arrival = loop, out, arrival
        self.row = -1
        self.tokens: list[int] = []
        self.next_slot = 0  # cache slot the next fed token is written to
        self.prefilled = 0  # prompt tokens in the cache so far (a long prompt is read over several steps)
        self.prompt_logprobs: list[TokenLogprob] = []  # scored so far, when the request asks
        self.paused = False  # at a chunk boundary, waiting for the chunk's memories
        self.paused_since = 0.0
        self.arrived: tuple[list[ExplicitMemory], _Note] | None = None  # next chunk's, not installed yet
        self.done = False
        # On the device that samples: a CPU generator with CUDA logits raised in the scheduler's step,
        # which failed every stream of the batch.
        self.generator = (torch.Generator(device=device).manual_seed(request.sampling.seed)
                          if request.sampling.seed is not None else None)
        self.last_token_time = 0.0
        # In the consumer's event loop: the retrieval for the next chunk in flight, cancelled (its merged
        # call too, once no other stream waits for it) when the request ends; and whether it has.
        self.swap: asyncio.Task | None = None
        self.closed = False

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt_ids)


class Scheduler:
    """Owns the model and its caches; runs in one thread."""

    def __init__(self, model: Transformer, config: EngineConfig, *, stop_token_ids: Sequence[int],
                 prefix: Sequence[int]) -> None:
        self.model, self.config = model, config
        self.mc = model.config
        self.max_seq_len = config.max_seq_len or self.mc.max_seq_len
        chunk = self.mc.chunk_len
        # Token rows a step's prefill passes may compute, padding included; None: no limit.
        self.prefill_budget = max(chunk, config.prefill_tokens // chunk * chunk) if config.prefill_tokens else None
        self.stop_ids = set(stop_token_ids)
        self.prefix = list(prefix)
        self.device = model.output.weight.device
        self.dtype = model.output.weight.dtype
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        cuda = self.device.type == "cuda"
        static = cuda if config.cuda_graphs is None else config.cuda_graphs
        self.passes = DecodePasses(model, config.max_batch, self.max_seq_len, static=static, cuda_graph=static and cuda)
        self.rows: list[_Stream | None] = [None] * config.max_batch
        # Rows whose first context slots hold the reference prefix's K/V, left by an earlier stream
        # with memory: the prefix depends on the weights only, so a stream with memory that joins
        # such a row does not write it again. A stream without memory writes its body there.
        self.row_has_prefix = [False] * config.max_batch
        self.ready: list[_Stream] = []
        self.prefilling: list[_Stream] = []  # streams with a row whose prompt is not all read yet, oldest first
        # Per row, for streams with penalties or a logit bias (`_adjusted`): (max_batch, V) counts of the ids
        # generated so far and the dense logit bias; made when the first such stream joins.
        self.token_counts: Tensor | None = None
        self.logit_bias: Tensor | None = None
        self.wake = threading.Event()
        self.stopping = False
        self.draining = False  # streams admitted from now on fail (`GenerationEngine.begin_drain`)
        self.thread = threading.Thread(target=self._run, name="memory3-scheduler", daemon=True)
        # Set by the engine: callback(stream, _Retrieve) starting a retrieval; it is called in the
        # stream's event loop, with the step's other messages.
        self.on_swap = None
        # Set by the engine: called after each step's gauges, to count the streams still waiting.
        self.on_gauges = None
        self.outbox: list[tuple[_Stream, object]] = []  # messages to consumers, sent once per step
        # Moving averages of the time between decode steps and between rows freed; read by the
        # engine to tell how long a retrieval may take without delaying its stream.
        self.step_s = 0.0
        self.turnover_s = 0.0
        self._last_step = self._last_release = 0.0
        # What the engine's health reads (`GenerationEngine.dead`, `failing`): when the loop last went round,
        # the scheduler steps that raised in a row and when the last did, and a device error, after
        # which no pass can succeed.
        self.beat = 0.0
        self.failed_steps = 0
        self.last_failure = 0.0
        self.device_error: str | None = None

    # ---- called from other threads ----
    def post(self, message) -> None:
        self.inbox.put(message)
        self.wake.set()

    def start(self) -> None:
        with torch.inference_mode():
            self.model.setup_caches(self.config.max_batch, self.max_seq_len, memory=True)
            self.passes.capture()
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.passes.release()
            self.model.clear_caches()  # the model may be used again, e.g. by another engine

    # ---- the loop ----
    def _run(self) -> None:
        cpu = time.thread_time()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # graphs replay on this thread's device (a new thread's is cuda:0)
        with torch.inference_mode():
            while not self.stopping:
                self.beat = time.monotonic()
                try:
                    if self._step():
                        self.failed_steps = 0
                except Exception as e:  # noqa: BLE001 - a bug must not kill the engine silently
                    log.exception("scheduler step failed; failing the streams it held")
                    self.failed_steps += 1
                    self.last_failure = time.monotonic()
                    if _is_device_error(e):
                        self.device_error = f"{type(e).__name__}: {e}"[:500]
                    self._fail_all(ServiceError("internal error in the decoder"))
                self._send_outbox()
                now = time.thread_time()
                metrics.SCHEDULER_CPU.inc(now - cpu)
                cpu = now
            self._drain_inbox()  # what streams that ended before the stop said of themselves

    def _emit(self, stream: _Stream, message) -> None:
        self.outbox.append((stream, message))

    def _send_outbox(self) -> None:
        """Hand a step's messages to their consumers' event loops, one wake-up per loop.

        A step emits a token for every stream in the batch, and asks for a retrieval now and then;
        one thread-safe call per message would wake the event loop (a syscall, and a turn of the
        loop, while the GIL passes back and forth with this thread) once per stream per step.
        """
        if not self.outbox:
            return
        batch, self.outbox = self.outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, object]]] = {}
        for stream, message in batch:
            by_loop.setdefault(stream.loop, []).append((stream, message))
        for loop, messages in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop closed before the engine: its consumers are gone
                loop.call_soon_threadsafe(self._deliver, messages)

    def _deliver(self, messages: list[tuple[_Stream, object]]) -> None:
        """In the consumers' event loop: queue each message for its stream, start the retrievals asked for."""
        for stream, message in messages:
            if isinstance(message, _Retrieve):
                if not stream.done:  # a stream that ended since needs no memories
                    self.on_swap(stream, message)
            else:
                stream.out.put_nowait(message)

    def _step(self) -> bool:
        """One round: admit, read a share of the prompts, then decode a token for every active stream.
        True if a model pass ran."""
        self._drain_inbox()
        self._expire_deadlines()
        self._admit()
        prefilled = self._prefill_share()
        active = [s for s in self.rows if s is not None and not s.paused and not s.done and not s.prefilling]
        if not active:
            self._update_gauges()
            self._send_outbox()  # before sleeping: e.g. a failure noticed in the inbox
            if not self.prefilling:
                self.wake.wait(timeout=0.05)
                self.wake.clear()
            return prefilled
        self._decode(active)
        self._update_gauges()
        return True

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, stream, payload = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "admit":
                if self.draining:
                    self._finish_error(stream, Unavailable(NOT_STARTED_BY_DRAIN))
                else:
                    self.ready.append(stream)
            elif kind == "drain":
                self.draining = True
                for queued in list(self.ready):
                    self._finish_error(queued, Unavailable(NOT_STARTED_BY_DRAIN))
            elif kind == "cancel":
                self._release(stream)
                if stream in self.ready:
                    self.ready.remove(stream)
            elif kind == "stop" and not stream.done:  # its consumer found a stop string
                self._finish(stream, "stop")
            elif kind == "memories":
                self._memories_arrived(stream, payload)
            elif kind == "fail" and not stream.done:
                self._finish_error(stream, payload)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for stream in [*self.ready, *(s for s in self.rows if s is not None)]:
            deadline = stream.request.deadline
            if deadline is not None and now > deadline and not stream.done:
                where = ("while it waited for a batch row" if stream.row < 0
                         else "while its prompt was read" if stream.prefilling else "while generating")
                self._finish_error(stream, DeadlineExceeded(f"the request's deadline passed {where}"))

    def _admit(self) -> None:
        """Give waiting streams free rows; their prompts are read from the next share on."""
        joining: list[_Stream] = []
        while self.ready and None in self.rows:
            stream = self.ready.pop(0)
            if stream.done:
                continue
            stream.row = self.rows.index(None)
            self.rows[stream.row] = stream
            stream.next_slot = stream.prefix_len
            metrics.REQUEST_QUEUE_TIME.observe(time.monotonic() - stream.arrival)
            joining.append(stream)
        if joining:
            self._start_rows(joining)
            self.prefilling += joining

    def _start_rows(self, joining: list[_Stream]) -> None:
        """Ready the rows of streams that joined for their prompts: the prefix's K/V are written once
        into a row, and kept for its next stream with memory (a stream without memory writes its body
        there); a row's context starts with no resident memory."""
        missing = [s.row for s in joining if s.prefix_len and not self.row_has_prefix[s.row]]
        if missing:
            self.model.write_prefix(torch.tensor(self.prefix, device=self.device),
                                    torch.tensor(missing, device=self.device))
        for s in joining:
            self.row_has_prefix[s.row] = bool(s.prefix_len)
            self.model.install_memories(s.row, ())
            if s.request.sampling.adjusts_logits:
                if self.token_counts is None:
                    vocab = self.model.output.weight.shape[0]
                    self.token_counts = torch.zeros(self.config.max_batch, vocab, device=self.device)
                    self.logit_bias = torch.zeros(self.config.max_batch, vocab, device=self.device)
                self.token_counts[s.row] = 0
                self.logit_bias[s.row] = logit_bias_row(s.request.sampling, self.logit_bias.shape[1], self.device)

    def _prefill_share(self) -> bool:
        """Read a share of the prompts being read; True if any were.

        A pass pads every share to its longest, so the budget of `prefill_tokens` token rows is split
        evenly: of the streams being read, as many as can have a chunk each (the oldest first) get up to
        budget / n tokens, in whole chunks, a stream's last share excepted. A short prompt that joins
        while a long one is read is read at once, beside a share of the long one, not after all of it.
        Streams of one layout (with or without the prefix) are read together, in one pass.
        """
        self.prefilling = [s for s in self.prefilling if not s.done and s.prefilling]
        reading, cap = self.prefilling, None
        if self.prefill_budget is not None and reading:
            chunk = self.mc.chunk_len
            reading = reading[:self.prefill_budget // chunk]
            cap = self.prefill_budget // len(reading) // chunk * chunk  # (passes' rows) <= len(reading) * cap
        left = [len(s.request.prompt_ids) - s.prefilled for s in reading]
        shares = [(s, n if cap is None else min(n, cap)) for s, n in zip(reading, left, strict=True)]
        # A pass that scores its prompts computes every position's logits: the others need only the last.
        for layout in sorted({_pass_layout(s) for s, _ in shares}):
            self._prefill([(s, n) for s, n in shares if _pass_layout(s) == layout])
        return bool(shares)

    def _prefill(self, shares: list[tuple[_Stream, int]]) -> None:
        """One pass over the next `n` prompt tokens of each stream, right-padded, written into its cache row.

        The first generated chunk keeps the last prompt chunk's memories; the other rows keep none.
        A pass with explicit memories skips the resident slots, so the kept ones are installed after
        the stream's last share.
        """
        streams = [s for s, _ in shares]
        p = streams[0].prefix_len
        counts = torch.tensor([n for _, n in shares])
        tokens = torch.zeros(len(shares), int(counts.max()), dtype=torch.long)  # (B, T), right-padded
        for i, (s, n) in enumerate(shares):
            tokens[i, :n] = torch.tensor(s.request.prompt_ids[s.prefilled:s.prefilled + n])
        tokens = tokens.to(self.device)
        # Stream i's tokens go to slots p + prefilled_i, p + prefilled_i + 1, ...; its padding may run
        # past the row's end, so it is kept in the last slot, which no prompt reaches (it leaves room
        # for a token) and every stream writes before it reads.
        starts = torch.tensor([p + s.prefilled for s in streams])
        slots = (starts[:, None] + torch.arange(tokens.shape[1])).clamp(max=self.max_seq_len - 1)  # (B, T)
        slots = slots.to(self.device)
        positions = _positions(slots, p, self.mc.ref_len)
        rows = torch.tensor([s.row for s in streams], device=self.device)
        memory = token_group = None
        # Each share starts at a chunk boundary: its token t reads its group t // chunk_len.
        first_group = [s.prefilled // self.mc.chunk_len for s in streams]
        groups = [s.groups[g:g + -(-n // self.mc.chunk_len)] for (s, n), g in zip(shares, first_group, strict=True)]
        if any(any(g) for g in groups):
            memory = stack_memories(groups, slots_per_group=self.mc.mem_slots, device=self.device, dtype=self.dtype)
            body = torch.arange(tokens.shape[1], device=self.device)
            token_group = (body // self.mc.chunk_len).expand(len(streams), -1)  # (B, T)
        scoring = streams[0].request.prompt_logprobs is not None  # the pass's streams all do, or none
        logits = self.model(tokens, positions, memory=memory, token_group=token_group, cache_slots=slots,
                            cache_rows=rows, logits_at=None if scoring else (counts - 1).to(self.device))
        if scoring:
            self._score_prompts(shares, logits)  # logits: (B, T, V)
            last = logits[torch.arange(len(shares), device=self.device), (counts - 1).to(self.device)]  # (B, V)
        else:
            last = logits[:, 0]  # (B, V)
        done: list[int] = []
        for i, (s, n) in enumerate(shares):
            s.prefilled += n
            s.next_slot = p + s.prefilled
            metrics.PROMPT_TOKENS.inc(n)
            if not s.prefilling:
                done.append(i)
                if s.resident is not None:
                    self.model.install_memories(s.row, s.resident)
                elif s.groups and s.groups[-1]:
                    self.model.keep_resident(s.row, memory, i, len(groups[i]) - 1)
        for i in done:
            if scoring:
                self._emit(streams[i], _PromptLogprobs(streams[i].prompt_logprobs))
            if not streams[i].request.max_tokens:  # scored, nothing to generate
                self._finish(streams[i], "length")
        done = [i for i in done if streams[i].request.max_tokens]
        if done:
            finished = [streams[i] for i in done]
            self._accept_all(finished, self._sample(finished, last[done]))

    @staticmethod
    def _score_prompts(shares: list[tuple[_Stream, int]], logits: Tensor) -> None:
        """Each share's prompt logprobs: the logits at a share's position j (B, T, V) score the prompt
        token after it, in pieces of a few hundred positions (a whole share's float log-softmax over a
        large vocabulary would take gigabytes)."""
        for i, (s, n) in enumerate(shares):
            prompt, start = s.request.prompt_ids, s.prefilled
            scored = min(n, len(prompt) - 1 - start)  # the last prompt token's logits are the first sampled
            for j in range(0, scored, SCORED_PER_PIECE):
                end = min(scored, j + SCORED_PER_PIECE)
                s.prompt_logprobs += _token_logprobs(logits[i, j:end], prompt[start + j + 1 : start + end + 1],
                                                     [s.request.prompt_logprobs] * (end - j),
                                                     s.request.sampling.vocab_limit, ranked=True)

    def _decode(self, active: list[_Stream]) -> None:
        self.step_s, self._last_step = _moving_average(self.step_s, self._last_step)
        # The rows of the pass: those up to the highest in use, padded to the pass's shape.
        hi = self.passes.rows_for(max(s.row for s in self.rows if s is not None and not s.done) + 1)
        # Built as lists, one tensor at the end: per-element writes into tensors cost the thread that
        # drives the device ~0.2 ms a step at 32 rows, the lists ~0.03 ms.
        tokens = [0] * hi
        # An idle row among them is fed a placeholder too. It goes to the first slot after the
        # reference prefix, which a row keeps for its next stream with memory (`row_has_prefix`);
        # every stream writes that slot before it reads it.
        slots = [len(self.prefix)] * hi
        prefix_lens = [0] * hi
        for s in self.rows[:hi]:
            if s is None or s.done:
                continue
            # A paused row, or one whose prompt is still being read, gets a placeholder at its next
            # slot; the real token overwrites it later.
            tokens[s.row] = 0 if s.paused or s.prefilling else s.tokens[-1]
            slots[s.row] = s.next_slot
            prefix_lens[s.row] = s.prefix_len
        fed, at, prefix_len = torch.tensor([tokens, slots, prefix_lens])[..., None]  # (hi, 1) each
        logits = self.passes(fed, _positions(at, prefix_len, self.mc.ref_len), at)  # (hi, V)
        for s in active:
            s.next_slot += 1
        rows = torch.tensor([s.row for s in active], device=self.device)
        self._accept_all(active, self._sample(active, logits[rows]))

    def _sample(self, streams: list[_Stream], logits: Tensor) -> list[tuple[int, TokenLogprob | None] | None]:
        """Each stream's next token, drawn after its penalties and logit bias, and its logprobs where
        its request asks for them; `logits` (B, V) are the model's. None for a stream whose logits
        hold NaN or inf: no token is drawn from them.

        Such logits are replaced by zeros before drawing (multinomial asserts on the device on NaN,
        which breaks a CUDA context, and argmax picks NaN's id), and are found on the host once the
        draw has synchronised anyway: no step waits for the check.
        """
        finite = torch.isfinite(logits).all(dim=-1)  # (B,)
        logits = torch.where(finite[:, None], logits, 0)
        picked = self._pick(streams, self._adjusted(streams, logits))
        self._count(streams, picked)
        drawn = list(zip(picked, self._logprobs(streams, logits, picked), strict=True))
        return [item if ok else None for item, ok in zip(drawn, finite.tolist(), strict=True)]

    def _accept_all(self, streams: list[_Stream], drawn: list[tuple[int, TokenLogprob | None] | None]) -> None:
        """Take each stream's drawn token; fail the streams the model gave no finite logits, and clear
        their rows, which may hold NaN or inf for the next stream."""
        broken = [s for s, item in zip(streams, drawn, strict=True) if item is None]
        if broken:
            log.error("the model's logits held NaN or inf for %d streams; their cache rows are cleared", len(broken))
            self.model.clear_rows([s.row for s in broken])
            for s in broken:
                self.row_has_prefix[s.row] = False
                self._finish_error(s, ServiceError(NON_FINITE_LOGITS))
        for s, item in zip(streams, drawn, strict=True):
            if item is not None:
                self._accept(s, *item)

    def _adjusted(self, streams: list[_Stream], logits: Tensor) -> Tensor:
        """(B, V) logits with each stream's penalties (over the tokens it generated) and logit bias,
        and without the ids that would end a stream short of its `min_tokens`."""
        chosen = [i for i, s in enumerate(streams) if s.request.sampling.adjusts_logits]
        held = [(i, ids) for i, s in enumerate(streams) if (ids := self._held_back(s))]
        if not chosen and not held:
            return logits
        out = logits.to(torch.float32, copy=True)
        if chosen:
            params = [streams[i].request.sampling for i in chosen]
            rows = torch.tensor([streams[i].row for i in chosen], device=self.device)
            index = torch.tensor(chosen, device=logits.device)
            presence = torch.tensor([p.presence_penalty for p in params], device=self.device)
            frequency = torch.tensor([p.frequency_penalty for p in params], device=self.device)
            out[index] = penalize(logits[index], self.token_counts[rows], presence, frequency, self.logit_bias[rows])
        if held:  # one indexed write for every such stream: (stream, id) pairs
            out[[i for i, ids in held for _ in ids], [t for _, ids in held for t in ids]] = float("-inf")
        return out

    def _held_back(self, stream: _Stream) -> list[int]:
        """The ids that would end `stream` now, while it has fewer than its `min_tokens`."""
        request = stream.request
        if len(stream.tokens) >= request.min_tokens:
            return []
        return [*request.stop_token_ids, *(() if request.ignore_eos else self.stop_ids)]

    def _count(self, streams: list[_Stream], picked: list[int]) -> None:
        """Count the tokens just picked by the streams whose penalties read the counts."""
        chosen = [i for i, s in enumerate(streams) if s.request.sampling.presence_penalty
                  or s.request.sampling.frequency_penalty]
        if chosen:
            rows = torch.tensor([streams[i].row for i in chosen], device=self.device)
            tokens = torch.tensor([picked[i] for i in chosen], device=self.device)
            self.token_counts.index_put_((rows, tokens), torch.ones(len(chosen), device=self.device), accumulate=True)

    @staticmethod
    def _logprobs(streams: list[_Stream], logits: Tensor, picked: list[int]) -> list[TokenLogprob | None]:
        """For the streams that ask: the picked token's log-probability and the `logprobs` most likely ids'."""
        out: list[TokenLogprob | None] = [None] * len(streams)
        want = [i for i, s in enumerate(streams) if s.request.logprobs is not None]
        if want:
            found = _token_logprobs(logits[want], [picked[i] for i in want],
                                    [streams[i].request.logprobs for i in want],
                                    streams[want[0]].request.sampling.vocab_limit)
            for i, item in zip(want, found, strict=True):
                out[i] = item
        return out

    @staticmethod
    def _pick(streams: list[_Stream], logits: Tensor) -> list[int]:
        """Sample one token per stream; greedy and same-parameter streams share one call."""
        out: list[int | None] = [None] * len(streams)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(streams):
            if s.generator is not None:
                params = s.request.sampling
                out[i] = int(sample(logits[i : i + 1], params, s.generator)[0])
            else:
                p = s.request.sampling
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for idx in groups.values():
            params = streams[idx[0]].request.sampling
            picked = sample(logits[idx], params).tolist()
            for i, tok in zip(idx, picked, strict=True):
                out[i] = tok
        return out  # type: ignore[return-value]

    def _accept(self, stream: _Stream, token: int, logprob: TokenLogprob | None = None) -> None:
        now = time.monotonic()
        if not stream.tokens:
            metrics.TIME_TO_FIRST_TOKEN.observe(now - stream.arrival)
        else:
            metrics.INTER_TOKEN_LATENCY.observe(now - stream.last_token_time)
        stream.last_token_time = now
        metrics.GENERATION_TOKENS.inc()
        request = stream.request
        if token in self.stop_ids and (not request.ignore_eos or token in request.stop_token_ids):
            # Counted and listed, never spelled, as vLLM does, logprobs or not: with them alone it
            # was, and a reply's `completion_tokens` depended on whether logprobs were asked for.
            self._emit(stream, _Tokens([token], [logprob] if logprob is not None else [], spelled=False))
            self._finish(stream, "stop")
            return
        stream.tokens.append(token)
        stopped = token in request.stop_token_ids
        self._emit(stream, _Tokens([token], [logprob] if logprob is not None else [], spelled=not stopped))
        if stopped:
            self._finish(stream, "stop")
            return
        n = len(stream.tokens)
        if n >= request.max_tokens or stream.next_slot >= self.max_seq_len:
            self._finish(stream, "length")
            return
        i = n - 1  # index of the token about to be fed
        chunk, lead = self.mc.chunk_len, self.config.retrieval_lead_tokens
        if not stream.prefix_len or self.on_swap is None:
            return
        if i > 0 and i % chunk == 0:  # token i starts a chunk: it reads that chunk's memories
            if stream.arrived is not None:
                self._apply_swap(stream)
            else:
                stream.paused, stream.paused_since = True, now
        elif (i + 1 + lead) % chunk == 0 and i + 1 + lead >= chunk and n + lead + 1 < stream.request.max_tokens \
                and stream.next_slot + lead + 1 < self.max_seq_len:
            # The next chunk starts lead + 1 tokens on, and its query is known now: retrieve while
            # they are fed. (A stream that cannot reach the next chunk retrieves nothing.)
            query = query_window(stream.request.prompt_ids, stream.tokens, chunk, 0)
            self._emit(stream, _Retrieve(query, (i + 1 + lead) // chunk, (lead + 1) * self.step_s))

    def _memories_arrived(self, stream: _Stream, payload: tuple[list[ExplicitMemory], _Note]) -> None:
        if stream.done or stream.row < 0:
            return
        stream.arrived = payload
        if stream.paused:
            self._apply_swap(stream)

    def _apply_swap(self, stream: _Stream) -> None:
        """Install the next chunk's memories in the stream's row; its consumer hears of them now."""
        memories, note = stream.arrived
        stream.arrived = None
        self.model.install_memories(stream.row, memories)
        self._emit(stream, note)
        metrics.MEMORY_WAIT.observe(time.monotonic() - stream.paused_since if stream.paused else 0.0)
        stream.paused = False

    def _finish(self, stream: _Stream, reason: str) -> None:
        self._release(stream)  # before the consumer hears of it: its slot is free by then
        self._emit(stream, _Finished(reason))  # counted by its consumer (`GenerationEngine.generate`)

    def _finish_error(self, stream: _Stream, error: ServiceError) -> None:
        self._release(stream)
        if stream in self.ready:
            self.ready.remove(stream)
        self._emit(stream, _Failed(error))  # counted by its consumer (`GenerationEngine.generate`)

    def _release(self, stream: _Stream) -> None:
        stream.done = True
        if 0 <= stream.row < len(self.rows) and self.rows[stream.row] is stream:
            self.rows[stream.row] = None
            self.turnover_s, self._last_release = _moving_average(self.turnover_s, self._last_release)

    def _fail_all(self, error: ServiceError) -> None:
        for s in [*self.ready, *(s for s in self.rows if s is not None)]:
            if not s.done:
                self._finish_error(s, error)
        self.ready.clear()

    def _update_gauges(self) -> None:
        metrics.NUM_REQUESTS_RUNNING.set(self.running())
        if self.on_gauges is not None:
            self.on_gauges()

    def running(self) -> int:
        return sum(1 for s in self.rows if s is not None and not s.done)


def _pass_layout(stream: _Stream) -> tuple[int, bool]:
    """Streams read in one prefill pass share this: the reference prefix or not, scored or not."""
    return stream.prefix_len, stream.request.prompt_logprobs is not None


def _token_logprobs(logits: Tensor, tokens: Sequence[int], top: Sequence[int],
                    vocab_limit: int | None, *, ranked: bool = False) -> list[TokenLogprob]:
    """(N, V) logits -> the log-probability of each of the N `tokens` and of its position's `top[n]`
    most likely ids, over the tokenizer's ids (a padded embedding's extra ids are never sampled);
    `ranked`: each token's rank too."""
    logprobs = logits[:, :vocab_limit].float().log_softmax(dim=-1)  # (N, vocab)
    index = torch.tensor(list(tokens), device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, index)  # (N, 1)
    # As vLLM (V1) ranks: the ids at least as likely, itself included (a tie takes the worst rank).
    ranks = (logprobs >= chosen).sum(dim=1).tolist() if ranked else [None] * len(tokens)
    k = max(top)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(t, c, list(zip(ids[:n], values[:n], strict=True)), rank)
            for t, c, n, ids, values, rank in zip(tokens, chosen[:, 0].tolist(), top, top_ids, top_values, ranks,
                                                  strict=True)]


def _is_device_error(error: Exception) -> bool:
    """An accelerator fault (an illegal memory access, a lost device): the CUDA context is unusable
    until the process restarts, so every later pass fails too. Running out of memory is not one."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(error, accelerator_error)) or \
        (isinstance(error, RuntimeError) and "CUDA error" in str(error))


def _moving_average(average: float, last: float, *, gap_s: float = 1.0) -> tuple[float, float]:
    """(average, last) updated with the interval since `last`, an event's time; a gap over `gap_s`
    (the scheduler was idle) starts the intervals anew."""
    now = time.monotonic()
    if last and now - last < gap_s:
        average = now - last if not average else average + 0.1 * (now - last - average)
    return average, now


def _positions(slots: Tensor, prefix_len: Tensor | int, ref_len: int) -> Tensor:
    """Cache slots -> RoPE positions with a per-row prefix length (0: plain layout, no memory gap)."""
    if isinstance(prefix_len, int):
        return slots if prefix_len == 0 else torch.where(slots < prefix_len, slots, slots + ref_len)
    return torch.where((slots < prefix_len) | (prefix_len == 0), slots, slots + ref_len)


class GenerationEngine:
    """The asyncio face of the scheduler: one `generate()` call per request."""

    def __init__(self, model: Transformer, codec: TextCodec, retrieval: Retrieval | None,
                 config: EngineConfig = EngineConfig(), *, release: str = "") -> None:
        if config.retrieval_lead_tokens > model.config.chunk_len - 2:
            # A lead of chunk_len - 1 would ask for a chunk's successor at the chunk's first token,
            # while that token may still be waiting for its own memories.
            raise ValueError(f"retrieval_lead_tokens must be at most {model.config.chunk_len - 2} for chunks of "
                             f"{model.config.chunk_len} tokens, got {config.retrieval_lead_tokens}: give "
                             f"--retrieval-lead-tokens {model.config.chunk_len - 2} or less")
        model.eval()
        self.model, self.codec, self.retrieval, self.config = model, codec, retrieval, config
        self.release = release
        self.mc = model.config
        self.prefix = codec.reference_prefix(self.mc)
        self.scheduler = Scheduler(model, config, stop_token_ids=[codec.eos_id], prefix=self.prefix)
        self.scheduler.on_swap = self._schedule_swap
        self.scheduler.on_gauges = self._update_waiting
        self._retrieve_by = getattr(retrieval, "retrieve_by", None)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.accepted = 0  # requests between acceptance and their end (waiting + running)
        self.per_client: dict[str, int] = {}  # accepted requests by client id
        self.started = False
        self.draining = False
        self._dead: str | None = None  # `dead`'s reason, once it has one
        self._tasks: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def max_seq_len(self) -> int:
        return self.scheduler.max_seq_len

    def dead(self) -> str | None:
        """Why the engine can serve nothing until its process restarts, or None: its scheduler thread
        stopped, was stuck in one step (a hung device), or the device failed. For good once said: a pass
        stuck past `stall_s` that ends after all left a predictor live but never ready again."""
        if not self.started:
            return None
        if self._dead is None:
            self._dead = self._fault()
        return self._dead

    def _fault(self) -> str | None:
        scheduler = self.scheduler
        if not scheduler.thread.is_alive():
            return "the scheduler thread has stopped"
        if scheduler.device_error is not None:
            return f"the device failed ({scheduler.device_error})"
        stuck = time.monotonic() - scheduler.beat
        if scheduler.beat and stuck > self.config.stall_s:
            return f"the scheduler has been in one step for {stuck:.0f}s (more than {self.config.stall_s:g}s)"
        return None

    def failing(self) -> str | None:
        """Why the engine cannot serve now, or None: `dead`, or its last FAILING_STEPS scheduler steps
        failed (each fails the streams it held), the last less than FAILING_FOR_S ago: whatever failed
        them fails the next request too. Once that long passes without a failure it is taken as sound
        again: a pod that is not ready gets no request whose step could succeed and show it."""
        reason = self.dead()
        if reason is None and self.scheduler.failed_steps >= FAILING_STEPS and \
                time.monotonic() - self.scheduler.last_failure < FAILING_FOR_S:
            reason = f"the last {self.scheduler.failed_steps} scheduler steps failed"
        return reason

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.scheduler.start)
        self.started = True

    def begin_drain(self) -> None:
        """Refuse new requests, and fail those still queued for a row: they would be started only to
        be cut when the grace period ends, and have produced nothing, so a client loses nothing by
        retrying them on another replica at once. Streams holding a row go on."""
        self.draining = True
        self.scheduler.post(("drain", None, None))

    async def stop(self) -> None:
        """`begin_drain`, let the running streams finish, then stop the scheduler."""
        self.begin_drain()
        await self._idle.wait()
        await self.close()

    async def close(self) -> None:
        if self.started:
            await asyncio.to_thread(self.scheduler.stop)
            self.started = False

    def _update_waiting(self) -> None:
        """Accepted but holding no batch row yet (queued, or fetching its prompt's memories); called
        when a request comes or ends, and by the scheduler once a step has admitted or freed rows."""
        metrics.NUM_REQUESTS_WAITING.set(max(0, self.accepted - self.scheduler.running()))

    # ---- validation ----
    def room(self, body: Sequence[int], use_memory: bool) -> int:
        """How many tokens a prompt `body` leaves room for in a row of this server's context (the
        reference prefix takes some only where memories are read: asked for, and a retrieval to read)."""
        return self.max_seq_len - self._prefix_room(use_memory) - len(body)

    def _prefix_room(self, use_memory: bool) -> int:
        return len(self.prefix) if use_memory and self.retrieval is not None else 0

    def validate(self, request: GenerationRequest) -> None:
        body = request.prompt_ids
        if len(body) <= 1:
            raise InvalidInput("the prompt is empty: give some text or token ids")
        bad = [t for t in body if not 0 <= t < self.codec.vocab_size]
        if bad:
            raise InvalidInput(f"token id {bad[0]} is outside the tokenizer's vocabulary "
                               f"(0..{self.codec.vocab_size - 1})")
        scoring = request.prompt_logprobs is not None
        if request.max_tokens < (0 if scoring else 1):
            raise InvalidInput(f"max_tokens must be >= 1 (0 only to score a prompt), got {request.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(request, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidInput(f"{name}: the alternatives to report per token are 0..{MAX_LOGPROBS}, got {value}")
        bad = [t for t, _ in request.sampling.logit_bias if t >= self.codec.vocab_size]
        if bad:
            raise InvalidInput(f"logit_bias: token id {bad[0]} is outside the tokenizer's vocabulary "
                               f"(0..{self.codec.vocab_size - 1})")
        if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidInput(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(request.stop_token_ids)}")
        bad = [t for t in request.stop_token_ids if not 0 <= t < self.codec.vocab_size]
        if bad:
            raise InvalidInput(f"stop_token_ids: token id {bad[0]} is outside the tokenizer's vocabulary "
                               f"(0..{self.codec.vocab_size - 1})")
        if not 0 <= request.min_tokens <= request.max_tokens:
            raise InvalidInput(f"min_tokens must be in 0..max_tokens ({request.max_tokens}), got {request.min_tokens}"
                               + (": raise max_tokens too" if request.min_tokens > request.max_tokens else ""))
        room = self.room(body, request.use_memory)
        if room < 1:
            raise InvalidInput(f"the prompt has {len(body)} tokens; this server's context holds "
                               f"{self.max_seq_len - self._prefix_room(request.use_memory) - 1} prompt tokens at "
                               "most: shorten it")
        if request.max_tokens > room:
            raise InvalidInput(f"max_tokens={request.max_tokens} does not fit: the prompt ({len(body)} tokens) "
                               f"leaves room for {room} new tokens in this server's context of {self.max_seq_len}")

    # ---- a request ----
    async def complete(self, request: GenerationRequest) -> GenerationEvent:
        """The whole answer as one event, for front ends that reply once (KServe, non-streamed OpenAI)."""
        whole = GenerationEvent()
        async for event in self.generate(request):
            whole.token_ids.extend(event.token_ids)
            whole.logprobs.extend(event.logprobs)
            whole.prompt_logprobs.extend(event.prompt_logprobs)
            whole.text += event.text
            whole.citations.extend(event.citations)
            whole.warnings.extend(event.warnings)
            whole.finish_reason, whole.usage = event.finish_reason, event.usage
        return whole

    async def generate(self, request: GenerationRequest, *,
                       on_queued: Callable[[], None] | None = None) -> AsyncIterator[GenerationEvent]:
        """Events for one request; closing the iterator early cancels it and frees its slot at once.
        `on_queued` is called once the request is accepted and queued for a batch row, its prompt's
        memories fetched: what can refuse it without waiting for other streams has passed.

        How every request ends is counted here, as its client sees it: errors
        (`memory3_request_failure_total`), those raised before it reaches the scheduler too (a
        retrieval outage under the fail policy, a corrupt memory in the prompt's fetch, a refusal at
        capacity), finish reasons (a stop string completed by the last token the scheduler counted
        as `length` is `stop`), and `abort` for a request its client left (a hang-up, a cancel), as
        vLLM counts it. Counted in the scheduler, a text service down failed every request and the
        error-ratio alert saw none."""
        if request.arrival is None:
            request = dataclasses.replace(request, arrival=time.monotonic())
        finished = False
        try:
            async with contextlib.aclosing(self._generate(request, on_queued)) as events:
                async for event in events:
                    if event.finish_reason is not None:
                        finished = True
                        metrics.REQUEST_SUCCESS.labels(finished_reason=event.finish_reason).inc()
                        metrics.E2E_REQUEST_LATENCY.observe(time.monotonic() - request.arrival)
                    yield event
        except ServiceError as e:
            metrics.REQUEST_FAILURE.labels(code=e.code.name).inc()
            raise
        except Exception:  # a bug: the front ends answer INTERNAL
            metrics.REQUEST_FAILURE.labels(code="INTERNAL").inc()
            raise
        except (GeneratorExit, asyncio.CancelledError):
            if finished:
                pass
            elif request.deadline is not None and time.monotonic() >= request.deadline:
                # gRPC cancelled the call at its deadline before the scheduler ended it: the same end
                metrics.REQUEST_FAILURE.labels(code="DEADLINE_EXCEEDED").inc()
            else:
                metrics.REQUEST_SUCCESS.labels(finished_reason="abort").inc()
            raise

    async def _generate(self, request: GenerationRequest,
                        on_queued: Callable[[], None] | None) -> AsyncIterator[GenerationEvent]:
        if not self.started or self.draining:
            raise Unavailable("the decoder is not accepting requests (starting or draining)")
        self.validate(request)
        request = dataclasses.replace(
            request, sampling=dataclasses.replace(request.sampling, vocab_limit=self.codec.vocab_size))
        client, limit = request.client_id, self.config.max_streams_per_client
        if limit and client and self.per_client.get(client, 0) >= limit:
            raise ResourceExhausted(f"client {client!r} already has {limit} streams open, the limit per client; "
                                    "wait for one to finish")
        if self.accepted >= self.config.max_batch + self.config.max_waiting:
            raise ResourceExhausted(f"the decoder is at capacity ({self.accepted} requests running or queued); "
                                    "retry with backoff")
        self.accepted += 1
        if client:
            self.per_client[client] = self.per_client.get(client, 0) + 1
        self._idle.clear()
        self._update_waiting()
        out: asyncio.Queue = asyncio.Queue()
        stream: _Stream | None = None
        try:
            warnings: list[str] = []
            citations: list[Citation] = []
            groups: list[list[ExplicitMemory]] = []
            resident: list[ExplicitMemory] | None = None
            use_memory = request.use_memory and self.retrieval is not None
            if use_memory:
                # Accepted beyond the batch's rows, this stream queues for one: its retrieval can
                # take that long, and share a call with others meanwhile.
                ahead = self.accepted - self.config.max_batch
                groups, resident, citations, failure = await self._prompt_memories(
                    request, ahead * self.scheduler.turnover_s if ahead > 0 else 0.0)
                if failure is not None:
                    warnings.append(failure)
            read = sum(len(g) for g in groups) + len(resident or ())
            stream = _Stream(request, len(self.prefix) if use_memory else 0, groups, self.loop, out, request.arrival,
                             self.scheduler.device, resident)
            self.scheduler.post(("admit", stream, None))
            if on_queued is not None:
                on_queued()
            async for event in self._relay(stream, out, citations, warnings, read):
                yield event
        finally:
            if stream is not None:
                stream.closed = True
                if stream.swap is not None:  # nobody will read the memories it retrieves
                    stream.swap.cancel()
                if not stream.done:
                    self.scheduler.post(("cancel", stream, None))
            self.accepted -= 1
            if client:
                left = self.per_client.pop(client) - 1
                if left:
                    self.per_client[client] = left
            self._update_waiting()
            if self.accepted == 0:
                self._idle.set()

    async def _relay(self, stream: _Stream, out: asyncio.Queue, citations: list[Citation], warnings: list[str],
                     memories_read: int) -> AsyncIterator[GenerationEvent]:
        request = stream.request
        detok = IncrementalDetokenizer(self.codec.decode)
        held = ""  # decoded text not sent yet: it may begin a stop string
        produced = 0
        retrievals = len(citations)
        pending = GenerationEvent(citations=list(citations), warnings=list(warnings))
        while True:
            message = await out.get()
            if isinstance(message, _Failed):
                raise message.error
            if isinstance(message, _PromptLogprobs):
                pending.prompt_logprobs = message.items
                continue
            if isinstance(message, _Note):
                if message.citation is not None:
                    pending.citations.append(message.citation)
                    retrievals += 1
                    memories_read += message.memories
                if message.warning is not None:
                    pending.warnings.append(message.warning)
                continue
            finish = None
            if isinstance(message, _Tokens):
                produced += len(message.ids)
                pending.token_ids.extend(message.ids)
                pending.logprobs.extend(message.logprobs)
                delta = detok.add(message.ids) if message.spelled else ""
            else:
                finish = message.reason
                delta = detok.add([], final=True)
            if request.stop:
                # Up to min_tokens, only a stop string that always ends it (a chat template's turn end);
                # the text that may begin another is held meanwhile, so that one ending after is found.
                stops = request.stop if produced > request.min_tokens else request.stop_always
                text = held + delta
                hit = _find_stop(text, stops)
                if hit is not None:
                    if finish is None:  # the scheduler still decodes it: ends it, counted as a success
                        self.scheduler.post(("stop", stream, None))
                    delta, held, finish = text[:hit], "", "stop"
                elif finish is None:
                    keep = _stop_prefix_len(text, request.stop)
                    delta, held = text[:len(text) - keep], text[len(text) - keep:]
                else:
                    delta, held = text, ""
            pending.text += delta
            if finish is not None:
                pending.finish_reason = finish
                pending.usage = Usage(len(request.prompt_ids), produced, retrievals, memories_read)
                yield pending
                return
            # Every step's token ids go out at once; a character split across tokens is held in the
            # detokenizer, so such an event's text is empty until the character completes.
            yield pending
            pending = GenerationEvent()

    async def _retrieve(self, queries: list[list[int]], include_text: bool,
                        needed_in_s: float) -> list[list[RetrievedReference]]:
        if self._retrieve_by is not None and needed_in_s > 0:
            return await self._retrieve_by(queries, self.mc.mems_per_chunk, include_text, needed_in_s)
        return await self.retrieval.retrieve(queries, self.mc.mems_per_chunk, include_text)

    async def _prompt_memories(self, request: GenerationRequest, needed_in_s: float):
        """The memories each prompt chunk reads; those the first generated chunk reads when they are not
        the last chunk's (else None); the citations; and a warning when retrieval was unavailable.

        A scored prompt's chunk reads the memories the chunk before it retrieved (the first, none), as a
        generated chunk does: a token's score then depends on the tokens before it alone. The first
        generated chunk still reads those the last chunk retrieved; scored without generating, the last
        chunk retrieves nothing, as no token would read it."""
        scored = request.prompt_logprobs is not None
        queries = [request.prompt_ids[s:e] for s, e in chunk_spans(len(request.prompt_ids), self.mc.chunk_len)]
        if scored and not request.max_tokens:
            queries.pop()
        groups: list[list[ExplicitMemory]] = []
        citations: list[Citation] = []
        failure = None
        if queries:
            try:
                found = await self._retrieve(queries, request.include_reference_text, needed_in_s)
                ids = sorted({r.id for refs in found for r in refs})
                fetched = dict(zip(ids, await self.retrieval.fetch(ids), strict=True)) if ids else {}
                groups = [[fetched[r.id] for r in refs] for refs in found]
                citations = [Citation(i, False, refs) for i, refs in enumerate(found)]
            except (Unavailable, DataLoss) as e:
                if self.config.retrieval_policy == "fail":
                    raise
                groups, failure = [[] for _ in queries], f"{_without_memory(e)}; generated without memory"
        resident = None
        if scored:
            if request.max_tokens and groups:
                groups, resident = groups[:-1], groups[-1]
            groups = [[], *groups]
        return groups, resident, citations, failure

    def _schedule_swap(self, stream: _Stream, ask: _Retrieve) -> None:
        """Asked by the scheduler, in this loop: retrieve for a stream's last chunk, off the batch."""
        if stream.closed:
            return
        task = stream.swap = asyncio.ensure_future(self._swap(stream, ask))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _swap(self, stream: _Stream, ask: _Retrieve) -> None:
        request, chunk_number = stream.request, ask.chunk_number
        prompt_chunks = len(chunk_spans(len(request.prompt_ids), self.mc.chunk_len))
        memories: list[ExplicitMemory] = []
        try:
            found = (await self._retrieve([ask.query], request.include_reference_text, ask.needed_in_s))[0]
            if found:
                memories = await self.retrieval.fetch([r.id for r in found])
            note = _Note(citation=Citation(prompt_chunks + chunk_number - 1, True, found), memories=len(memories))
        except (Unavailable, DataLoss) as e:
            if self.config.retrieval_policy == "fail":
                self.scheduler.post(("fail", stream, e))
                return
            note = _Note(warning=f"{_without_memory(e)}; chunk {chunk_number} generated without memory")
        except ServiceError as e:
            self.scheduler.post(("fail", stream, e))
            return
        except Exception:  # noqa: BLE001 - a bug fails its stream; left paused, the stream would hang
            log.exception("retrieval for a generated chunk failed")
            self.scheduler.post(("fail", stream, ServiceError("internal error while retrieving memories")))
            return
        # The scheduler installs them when the stream reaches the chunk, and passes the note on then:
        # a stream that stops first never cites a chunk it did not generate.
        self.scheduler.post(("memories", stream, (memories, note)))


def _without_memory(error: Unavailable | DataLoss) -> str:
    """Why a chunk read no memory under the "continue" policy: the services did not answer, or a memory
    failed validation (one corrupt blob failed every request that retrieved it, "continue" or not)."""
    if isinstance(error, DataLoss):
        return f"a memory failed validation ({error})"
    return f"retrieval unavailable ({error})"


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where in `text` the first stop string begins, or None."""
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that begins some stop string: held back, since the
    next tokens may complete the stop string, which is never sent."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:n])), default=0)


def new_request_id() -> str:
    import uuid

    return uuid.uuid4().hex

