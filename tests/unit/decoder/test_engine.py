"""The continuous-batching engine against the static-batch reference `generate`.

Streams join at different times, with different prompt lengths, cross chunk boundaries (memory
swaps) while others decode, and are cancelled; greedy tokens must equal what `generate` produces
for each stream alone with the same memories.
"""

import asyncio
import dataclasses
import sys
import threading
import time

import pytest
import torch

from memory3.model.decode_graphs import DecodePasses
from memory3.model.encoder import encode_references
from memory3.model.generate import SamplingParams, generate
from memory3.model.layout import rope_positions
from memory3.services.decoder import engine as engine_module
from memory3.services.decoder.engine import EngineConfig, GenerationEngine, GenerationRequest
from memory3.services.decoder.retrieval import RetrievedReference
from memory3.services.rpc import metrics
from memory3.services.rpc.errors import InvalidInput, ResourceExhausted, Unavailable

N_REFS = 12


class FakeRetrieval:
    """Deterministic retrieval over in-process memories: the point here is the engine's logic."""

    def __init__(self, memories, *, delay: float = 0.0, fail: bool = False) -> None:
        self.memories, self.delay, self.fail = memories, delay, fail
        self.queries: list[list[int]] = []

    @staticmethod
    def pick(query: list[int], k: int) -> list[int]:
        start = sum(query) % N_REFS
        return [(start + j) % N_REFS for j in range(min(k, 3))]

    async def retrieve(self, queries, top_k, include_text):
        if self.fail:
            raise Unavailable("text service down")
        await asyncio.sleep(self.delay)
        self.queries.extend(queries)
        return [[RetrievedReference(f"ref-{i}", 1.0, f"text {i}" if include_text else "")
                 for i in self.pick(q, top_k)] for q in queries]

    async def fetch(self, ids):
        await asyncio.sleep(self.delay)
        return [self.memories[int(i.split("-")[1])] for i in ids]

    def provider(self, queries):
        return [[self.memories[i] for i in self.pick(q, 5)] for q in queries]


@pytest.fixture(scope="module")
def memories(tiny_model, text_codec, prefix):
    gen = torch.Generator().manual_seed(3)
    refs = [torch.randint(3, 250, (tiny_model.config.ref_len,), generator=gen).tolist() for _ in range(N_REFS)]
    with torch.inference_mode():
        return encode_references(tiny_model, refs, prefix)


def prompts(n, text_codec):
    gen = torch.Generator().manual_seed(5)
    return [[text_codec.bos_id, *torch.randint(3, 250, (10 + 37 * i,), generator=gen).tolist()] for i in range(n)]


def run(coro):
    return asyncio.run(coro)


def failures(code: str) -> float:
    return metrics.REQUEST_FAILURE.labels(code=code)._value.get()


def successes(reason: str) -> float:
    return metrics.REQUEST_SUCCESS.labels(finished_reason=reason)._value.get()


async def collect(engine, request, *, delay_start: float = 0.0):
    await asyncio.sleep(delay_start)
    tokens, text, events = [], "", []
    async for event in engine.generate(request):
        tokens += event.token_ids
        text += event.text
        events.append(event)
    return tokens, text, events


def collect_alone(engine, request):
    """Start `engine`, run one request through it to the end, close it."""
    async def main():
        await engine.start()
        try:
            return await collect(engine, request)
        finally:
            await engine.close()

    return run(main())


def reference_tokens(model, body, memories_provider, prefix, max_tokens, eos, lead=0, sampling=SamplingParams(),
                     stop_ids=(), min_tokens=0):
    kwargs = {"prefix": prefix, "memory_provider": memories_provider, "query_lead": lead} if memories_provider else {}
    out = generate(model, [body], max_new_tokens=max_tokens, stop_tokens=[eos, *stop_ids], min_new_tokens=min_tokens,
                   sampling=dataclasses.replace(sampling, vocab_limit=259), **kwargs)
    return out.tokens[0]  # the end-of-sequence token included, as the engine lists it (unspelled)


@pytest.mark.parametrize(("use_memory", "stagger", "lead", "prefill_tokens"),
                         [(True, 0.01, 8, 2048), (False, 0.01, 8, 2048), (True, 0.0, 8, 2048), (True, 0.01, 0, 2048),
                          (True, 0.0, 62, 2048), (True, 0.0, 8, 64), (True, 0.01, 8, 128), (False, 0.0, 8, 128)])
def test_concurrent_streams_equal_generate_alone(tiny_model, text_codec, prefix, memories, use_memory, stagger,
                                                 lead, prefill_tokens):
    """Staggered arrivals join a running batch; simultaneous ones are prefilled together. With a small
    `prefill_tokens`, prompts are read a share at a time, shares of several streams in one pass."""
    retrieval = FakeRetrieval(memories, delay=0.002)
    bodies = prompts(5, text_codec)
    max_tokens = [150, 70, 3, 140, 65]

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval,
                                  EngineConfig(max_batch=3, max_waiting=8, retrieval_lead_tokens=lead,
                                               prefill_tokens=prefill_tokens))
        await engine.start()
        try:
            return await asyncio.gather(*[
                collect(engine, GenerationRequest(body, mt, use_memory=use_memory), delay_start=stagger * i)
                for i, (body, mt) in enumerate(zip(bodies, max_tokens, strict=True))])
        finally:
            await engine.close()

    results = run(main())
    for body, mt, (tokens, text, events) in zip(bodies, max_tokens, results, strict=True):
        with torch.inference_mode():
            expected = reference_tokens(tiny_model, body, retrieval.provider if use_memory else None, prefix, mt,
                                        text_codec.eos_id, lead)
        assert tokens == expected
        decoded = text_codec.decode(tokens)
        if "\ufffd" not in decoded:  # random weights may emit invalid UTF-8, whose deltas are best effort
            assert text == decoded
        assert events[-1].finish_reason in ("length", "stop")
        assert events[-1].usage.completion_tokens == len(tokens)
        # A swap happens before feeding generated token i (i = 64, 128, ...); the last token is never fed.
        last_fed = len(tokens) - 1 if events[-1].finish_reason == "stop" else len(tokens) - 2
        n_chunks = len(range(0, len(body), 64)) + max(0, last_fed // 64)
        cited = [c for e in events for c in e.citations]
        assert len(cited) == (n_chunks if use_memory else 0)
        assert [c.chunk_index for c in cited] == list(range(len(cited)))
    assert metrics.NUM_REQUESTS_RUNNING._value.get() == 0


def test_decode_passes_of_fixed_shapes_give_each_stream_the_tokens_of_generate(tiny_model, text_codec, prefix,
                                                                              memories, monkeypatch):
    """With `cuda_graphs` (run eagerly here) every decode pass is padded to a batch bucket and attends over a
    context bucket: rows past the highest in use get placeholders, as idle rows do. Three streams in rows
    0-2 decode in passes of 4 rows; two join after (rows 3 and 4), and a stream with memory takes the row
    that the short one without memory freed: each decodes what `generate` decodes alone."""
    retrieval = FakeRetrieval(memories, delay=0.002)
    bodies = prompts(6, text_codec)
    max_tokens = [150, 140, 130, 70, 5, 65]
    uses = [True, False, True, True, False, True]
    shapes, events = [], []  # events: ("padded", rows in use, rows computed), ("joined", row)
    run_pass, rows_for, start_rows = DecodePasses._run, DecodePasses.rows_for, engine_module.Scheduler._start_rows
    monkeypatch.setattr(DecodePasses, "_run", lambda self, rows, context: (shapes.append((rows, context)),
                                                                         run_pass(self, rows, context))[1])
    monkeypatch.setattr(DecodePasses, "rows_for", lambda self, rows: (events.append(("padded", rows,
                                                                                     rows_for(self, rows))),
                                                                      events[-1][2])[1])
    monkeypatch.setattr(engine_module.Scheduler, "_start_rows", lambda self, joining: (
        events.extend(("joined", s.row, s.request.use_memory) for s in joining), start_rows(self, joining))[1])
    requests = [GenerationRequest(body, mt, use_memory=use) for body, mt, use in zip(bodies, max_tokens, uses,
                                                                                        strict=True)]

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval,
                                  EngineConfig(max_batch=5, max_waiting=8, prefill_tokens=128, cuda_graphs=True))
        await engine.start()

        async def after_short():  # the short stream without memory, then one with memory in the row it freed
            return [await collect(engine, requests[4]), await collect(engine, requests[5])]

        try:
            first = asyncio.gather(*[collect(engine, r) for r in requests[:3]])
            for _ in range(10_000):  # until the first three decode, row 3 padding
                if ("padded", 3, 4) in events:
                    break
                await asyncio.sleep(0.001)
            rest = await asyncio.gather(collect(engine, requests[3]), after_short())
            return [*await first, rest[0], *rest[1]]
        finally:
            await engine.close()

    results = run(main())
    for body, mt, use, (tokens, _, _) in zip(bodies, max_tokens, uses, results, strict=True):
        with torch.inference_mode():
            expected = reference_tokens(tiny_model, body, retrieval.provider if use else None, prefix, mt,
                                        text_codec.eos_id, 8)
        assert tokens == expected
    padded_at = events.index(("padded", 3, 4))
    joined = [e[1:] for e in events[padded_at:] if e[0] == "joined"]
    assert 3 in [row for row, _ in joined]  # a row fed placeholders as padding, then a stream's
    plain_row = next(row for row, memory in joined if not memory)
    assert joined[-1] == (plain_row, True)  # with memory, in the row whose prefix one without overwrote
    assert {rows for rows, _ in shapes} <= {1, 2, 4, 5}
    assert {context for _, context in shapes} <= {256, 384, 512, 768, 1024}
    assert len({context for _, context in shapes}) >= 2  # the streams' contexts grew past a bucket


@pytest.mark.parametrize("use_memory", [True, False])
def test_a_long_prompt_is_read_in_shares_while_the_running_streams_keep_decoding(tiny_model, text_codec, prefix,
                                                                                 memories, use_memory, monkeypatch):
    """A prompt of 10 chunks is read 2 chunks per step; a decode step of the running stream comes
    between every two shares, and the long prompt's tokens still equal `generate`'s."""
    retrieval = FakeRetrieval(memories)
    gen = torch.Generator().manual_seed(11)
    short = prompts(1, text_codec)[0]
    long = [text_codec.bos_id, *torch.randint(3, 250, (10 * 64 - 1,), generator=gen).tolist()]
    shares, emitted = [], []
    running: list = []
    original_prefill = engine_module.Scheduler._prefill
    original_accept = engine_module.Scheduler._accept

    def prefill(self, batch):
        shares.append([(len(s.request.prompt_ids), n) for s, n in batch])
        emitted.append(len(running[0].tokens) if running else 0)
        original_prefill(self, batch)

    def accept(self, stream, token, logprob=None):
        if stream.request.prompt_ids == short and not running:
            running.append(stream)
        original_accept(self, stream, token, logprob)

    monkeypatch.setattr(engine_module.Scheduler, "_prefill", prefill)
    monkeypatch.setattr(engine_module.Scheduler, "_accept", accept)

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval,
                                  EngineConfig(max_batch=2, max_waiting=0, prefill_tokens=128))
        await engine.start()
        try:
            first = asyncio.ensure_future(collect(engine, GenerationRequest(short, 300, use_memory=use_memory,
                                                                            ignore_eos=True)))
            while not running:
                await asyncio.sleep(0.001)
            second = await collect(engine, GenerationRequest(long, 20, use_memory=use_memory))
            return await first, second
        finally:
            await engine.close()

    (short_tokens, _, _), (long_tokens, _, _) = run(main())
    long_shares = [n for batch in shares for length, n in batch if length == len(long)]
    assert long_shares == [128] * 5
    steps = [emitted[i] for i, batch in enumerate(shares) if batch[0][0] == len(long)]
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False)), steps  # the short stream went on
    assert len(short_tokens) == 300
    with torch.inference_mode():
        expected = reference_tokens(tiny_model, long, retrieval.provider if use_memory else None, prefix, 20,
                                    text_codec.eos_id, 8)
    assert long_tokens == expected


def test_a_share_near_the_end_of_its_row_is_read_with_a_longer_one(tiny_model, text_codec, prefix, memories):
    """The last 10 tokens of a prompt that nearly fills its row are read in one pass with another
    stream's 150: the shorter share's padding must stay inside its row, and neither stream's
    tokens may change."""
    retrieval = FakeRetrieval(memories)
    gen = torch.Generator().manual_seed(13)
    long = [text_codec.bos_id, *torch.randint(3, 250, (969,), generator=gen).tolist()]
    short = [text_codec.bos_id, *torch.randint(3, 250, (149,), generator=gen).tolist()]
    shares = []
    long_read = threading.Event()  # all but its last 10 tokens, in one share
    original_prefill = engine_module.Scheduler._prefill

    def prefill(self, batch):
        shares.append([n for _, n in batch])
        if len(shares) == 1:  # the long prompt's first share: the short stream joins before its second
            long_read.set()
            deadline = time.monotonic() + 30
            while self.inbox.empty() and time.monotonic() < deadline:
                time.sleep(0.001)
        original_prefill(self, batch)

    async def short_after_long():
        while not long_read.is_set():
            await asyncio.sleep(0.001)
        return await collect(engine, GenerationRequest(short, 20))

    engine = GenerationEngine(tiny_model, text_codec, retrieval,
                              EngineConfig(max_batch=2, max_waiting=2, prefill_tokens=960))
    engine.scheduler._prefill = prefill.__get__(engine.scheduler)

    async def main():
        await engine.start()
        try:
            return await asyncio.gather(collect(engine, GenerationRequest(long, 20)), short_after_long())
        finally:
            await engine.close()

    results = run(main())
    assert shares == [[960], [10, 150]]  # two streams: up to 448 each
    for body, (tokens, _, _) in zip([long, short], results, strict=True):
        with torch.inference_mode():
            expected = reference_tokens(tiny_model, body, retrieval.provider, prefix, 20, text_codec.eos_id, 8)
        assert tokens == expected


def shares_of_prompts_arriving_together(tiny_model, text_codec, bodies, prefill_tokens):
    """The shares of each prefill pass when `bodies` are all admitted in one step, in this order."""
    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=len(bodies), max_waiting=0,
                                                                         prefill_tokens=prefill_tokens))
    scheduler, passes = engine.scheduler, []
    original_admit, original_prefill = scheduler._admit, scheduler._prefill

    def admit():
        deadline = time.monotonic() + 30
        while not passes and len(scheduler.ready) < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.001)
            scheduler._drain_inbox()
        original_admit()

    def prefill(batch):
        passes.append([n for _, n in batch])
        original_prefill(batch)

    scheduler._admit, scheduler._prefill = admit, prefill

    async def main():
        await engine.start()
        try:
            tasks = []
            for body in bodies:
                tasks.append(asyncio.ensure_future(engine.complete(GenerationRequest(body, 3, use_memory=False,
                                                                                     ignore_eos=True))))
                await asyncio.sleep(0.01)
            await asyncio.gather(*tasks)
        finally:
            await engine.close()

    run(main())
    return passes


def test_a_prefill_pass_counts_its_padding_against_the_budget(tiny_model, text_codec):
    """Shares are padded to the longest in their pass: three short prompts beside a long one made a
    pass of 4 x 448 token rows under a budget of 512. The budget is split evenly instead, and the
    short prompts are read at once, beside a share of the long one."""
    gen = torch.Generator().manual_seed(0)
    shorts = [[text_codec.bos_id, *torch.randint(3, 250, (9,), generator=gen).tolist()] for _ in range(3)]
    long = [text_codec.bos_id, *torch.randint(3, 250, (999,), generator=gen).tolist()]
    passes = shares_of_prompts_arriving_together(tiny_model, text_codec, [*shorts, long], 512)
    assert passes[0] == [10, 10, 10, 128]
    assert all(len(p) * max(p) <= 512 for p in passes), passes
    assert sum(map(sum, passes)) == 3 * 10 + 1000


def test_no_prefill_limit_reads_prompts_arriving_together_in_one_pass(tiny_model, text_codec):
    gen = torch.Generator().manual_seed(0)
    bodies = [[text_codec.bos_id, *torch.randint(3, 250, (599,), generator=gen).tolist()] for _ in range(2)]
    assert shares_of_prompts_arriving_together(tiny_model, text_codec, bodies, 0) == [[600, 600]]


def test_a_row_reused_by_streams_with_and_without_memory_keeps_them_exact(tiny_model, text_codec, prefix, memories,
                                                                          monkeypatch):
    """One cache row serves streams in turn: the prefix K/V a stream with memory leaves behind is
    reused by the next such stream (written once), and overwritten by a stream without memory."""
    retrieval = FakeRetrieval(memories)
    bodies = prompts(4, text_codec)
    uses = [True, True, False, True]
    writes = []
    original = type(tiny_model).write_prefix
    monkeypatch.setattr(type(tiny_model), "write_prefix",
                        lambda self, prefix, rows=None: (writes.append(rows), original(self, prefix, rows)))

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=1, max_waiting=0))
        await engine.start()
        try:
            return [await collect(engine, GenerationRequest(body, 70, use_memory=use))
                    for body, use in zip(bodies, uses, strict=True)]
        finally:
            await engine.close()

    results = run(main())
    assert [rows.tolist() for rows in writes] == [[0], [0]]  # the first stream, and the one after no memory
    for body, use, (tokens, _, _) in zip(bodies, uses, results, strict=True):
        with torch.inference_mode():
            expected = reference_tokens(tiny_model, body, retrieval.provider if use else None, prefix, 70,
                                        text_codec.eos_id, 8)
        assert tokens == expected


def test_a_row_idle_below_a_busy_one_keeps_its_prefix_for_the_next_stream(tiny_model, text_codec, prefix, memories):
    """Every decode step covers the rows up to the highest busy one; an idle row among them once had
    a placeholder written into slot 0, its kept prefix's first slot, and the next stream with
    memory on that row read it."""
    retrieval = FakeRetrieval(memories)
    short, long, after = prompts(3, text_codec)

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=2, max_waiting=0))
        await engine.start()
        try:
            await asyncio.gather(collect(engine, GenerationRequest(short, 3)),  # row 0, idle once it ends
                                 collect(engine, GenerationRequest(long, 60), delay_start=0.01))  # row 1
            return await collect(engine, GenerationRequest(after, 40, ignore_eos=True))  # row 0 again
        finally:
            await engine.close()

    tokens, _, _ = run(main())
    with torch.inference_mode():
        out = generate(tiny_model, [after], max_new_tokens=40, prefix=prefix, memory_provider=retrieval.provider,
                       query_lead=8, sampling=SamplingParams(vocab_limit=259))
    assert tokens == out.tokens[0]


@pytest.mark.parametrize("lead", [0, 8])
def test_next_chunks_retrieval_overlaps_the_steps_before_the_chunk(tiny_model, text_codec, prefix, memories,
                                                                   monkeypatch, lead):
    """The swap's retrieval starts once its query's last token is sampled, `lead` tokens before the
    chunk ends (0: its last token), not a step later."""
    forward = tiny_model.forward

    def slow_forward(*args, **kwargs):  # a step long enough for the event loop to run meanwhile
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", slow_forward)
    sampled_when_asked: list[int] = []

    class Recording(FakeRetrieval):
        async def retrieve(self, queries, top_k, include_text):
            stream = engine.scheduler.rows[0]
            if stream is not None:  # a generated chunk's query (the prompt's come before admission)
                sampled_when_asked.append(len(stream.tokens))
            return await super().retrieve(queries, top_k, include_text)

    retrieval = Recording(memories)
    engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=1, retrieval_lead_tokens=lead))
    body = prompts(1, text_codec)[0]
    tokens, _, events = collect_alone(engine, GenerationRequest(body, 70, ignore_eos=True))
    # Tokens 0..63 form the first generated chunk; the next chunk's retrieval began while token
    # 63 - lead was being fed, with the 64 tokens known then as its query.
    assert sampled_when_asked == [64 - lead]
    assert retrieval.queries[-1] == [*body[1:], *tokens][len(body) - 1 + 64 - lead - 64 : len(body) - 1 + 64 - lead]
    assert [(c.chunk_index, c.generated) for e in events for c in e.citations][-1] == (1, True)
    monkeypatch.undo()
    with torch.inference_mode():
        expected = generate(tiny_model, [body], prefix=prefix, max_new_tokens=70, memory_provider=retrieval.provider,
                            sampling=SamplingParams(vocab_limit=259), query_lead=lead).tokens[0]
    assert tokens == expected


class PatientRetrieval(FakeRetrieval):
    """A retrieval that batches callers: records how soon each caller said it needs its answer."""

    def __init__(self, memories) -> None:
        super().__init__(memories)
        self.asked: list[tuple[str, float]] = []

    async def retrieve(self, queries, top_k, include_text):
        self.asked.append(("now", 0.0))
        return await super().retrieve(queries, top_k, include_text)

    async def retrieve_by(self, queries, top_k, include_text, needed_in_s):
        self.asked.append(("by", needed_in_s))
        return await super().retrieve(queries, top_k, include_text)


def test_retrievals_say_how_soon_their_stream_needs_them(tiny_model, text_codec, memories, monkeypatch):
    """A chunk's retrieval is needed lead + 1 steps on, at the pace the batch decodes; a prompt's
    is needed at once when a row is free, and after the streams ahead of it when it must queue."""
    forward = tiny_model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", slow_forward)
    retrieval = PatientRetrieval(memories)
    engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=1, retrieval_lead_tokens=8))
    body = prompts(1, text_codec)[0]
    collect_alone(engine, GenerationRequest(body, 70, ignore_eos=True))
    (prompt_kind, _), (chunk_kind, needed_in) = retrieval.asked
    assert prompt_kind == "now" and chunk_kind == "by"
    assert 9 * 0.02 * 0.7 < needed_in < 9 * 0.02 * 3  # 9 steps of about 20 ms

    monkeypatch.undo()
    retrieval.asked.clear()
    engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=1))
    engine.scheduler.turnover_s = 0.5  # a row freed every half second lately

    async def main():
        await engine.start()
        try:
            return await asyncio.gather(*(collect(engine, GenerationRequest(body, 3, ignore_eos=True))
                                          for _ in range(3)))
        finally:
            await engine.close()

    run(main())
    # Three streams for one row: the first starts at once; the second waits for one row to
    # free, the third for two.
    assert sorted(retrieval.asked) == [("by", 0.5), ("by", 1.0), ("now", 0.0)]


def test_retrieval_lead_must_leave_a_chunk_room(tiny_model, text_codec, memories):
    with pytest.raises(ValueError, match="retrieval_lead_tokens must be at most 62"):
        GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories), EngineConfig(retrieval_lead_tokens=63))
    with pytest.raises(ValueError, match="retrieval_lead_tokens must be >= 0"):
        EngineConfig(retrieval_lead_tokens=-1)


def test_a_drain_fails_the_queued_streams_at_once_and_lets_running_ones_finish(tiny_model, text_codec, memories):
    """Queued streams were started as rows freed during the drain, only to be cut when the grace
    period ended; they have produced nothing, so they are failed at once, for a client to retry."""
    retrieval = FakeRetrieval(memories, delay=0.3)
    body = prompts(1, text_codec)[0]

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=1, max_waiting=2))
        await engine.start()
        try:
            running = engine.generate(GenerationRequest(body, 60, use_memory=False, ignore_eos=True))
            first = await running.__anext__()
            queued = asyncio.ensure_future(collect(engine, GenerationRequest(body, 5, use_memory=False)))
            retrieving = asyncio.ensure_future(collect(engine, GenerationRequest(body, 5)))  # admitted after
            await asyncio.sleep(0.05)
            stopped = asyncio.ensure_future(engine.stop())
            for late in (queued, retrieving):
                with pytest.raises(Unavailable, match="had not started this request: retry it on another replica"):
                    await asyncio.wait_for(late, timeout=5)
            rest = [event async for event in running]
            await asyncio.wait_for(stopped, timeout=30)
            return first, rest
        finally:
            await engine.close()

    first, rest = run(main())
    assert len(first.token_ids) + sum(len(e.token_ids) for e in rest) == 60
    assert rest[-1].finish_reason == "length"


def test_queue_is_bounded_and_cancellation_frees_slots(tiny_model, text_codec, memories):
    retrieval = FakeRetrieval(memories)
    body = prompts(1, text_codec)[0]

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=1, max_waiting=1))
        await engine.start()
        try:
            first = engine.generate(GenerationRequest(body, 500, use_memory=False))
            await first.__anext__()  # running
            second = asyncio.ensure_future(collect(engine, GenerationRequest(body, 5, use_memory=False)))
            await asyncio.sleep(0.05)  # queued behind the first
            with pytest.raises(ResourceExhausted, match="capacity"):
                await collect(engine, GenerationRequest(body, 5, use_memory=False))
            await first.aclose()  # cancel: the queued stream gets the slot
            tokens, _, events = await asyncio.wait_for(second, timeout=30)
            assert len(tokens) == 5 and events[-1].finish_reason == "length"
            assert engine.accepted == 0
            assert engine.scheduler.running() == 0
        finally:
            await engine.close()

    run(main())


def test_each_streams_penalties_and_bias_apply_to_its_own_tokens_as_generate_applies_them(tiny_model, text_codec,
                                                                                            prefix, memories):
    """Streams of different settings share the batch's passes; each samples as `generate` does alone,
    past a chunk boundary (a memory swap) too."""
    retrieval = FakeRetrieval(memories)
    bodies = prompts(3, text_codec)
    settings = [SamplingParams(frequency_penalty=1.0, presence_penalty=0.5), SamplingParams(),
                SamplingParams(presence_penalty=-0.5, logit_bias=((text_codec.encode("e")[0], 4.0),))]

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=3))
        await engine.start()
        try:
            return await asyncio.gather(*[collect(engine, GenerationRequest(body, 90, sampling=sampling))
                                          for body, sampling in zip(bodies, settings, strict=True)])
        finally:
            await engine.close()

    results = run(main())
    with torch.inference_mode():
        for body, sampling, (tokens, _, _) in zip(bodies, settings, results, strict=True):
            assert tokens == reference_tokens(tiny_model, body, retrieval.provider, prefix, 90, text_codec.eos_id,
                                              lead=8, sampling=sampling)
        plain = reference_tokens(tiny_model, bodies[0], retrieval.provider, prefix, 90, text_codec.eos_id, lead=8)
    assert results[0][0] != plain  # the penalties changed what was generated


def test_a_row_forgets_the_counts_and_bias_of_the_stream_before(tiny_model, text_codec):
    body = prompts(1, text_codec)[0]
    biased = SamplingParams(logit_bias=((text_codec.encode("e")[0], 4.0),), frequency_penalty=1.0)
    penalized = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=1))
        await engine.start()
        try:
            return [(await collect(engine, GenerationRequest(body, 40, sampling=s, use_memory=False)))[0]
                    for s in (biased, penalized, penalized)]
        finally:
            await engine.close()

    first, second, third = run(main())
    with torch.inference_mode():
        assert first == reference_tokens(tiny_model, body, None, [], 40, text_codec.eos_id, sampling=biased)
        assert second == third == reference_tokens(tiny_model, body, None, [], 40, text_codec.eos_id,
                                                   sampling=penalized)


def test_min_tokens_and_stop_token_ids_end_each_stream_as_generate_ends_it(tiny_model, text_codec, prefix, memories):
    """vLLM's options, per stream of one batch: a stop token id ends its stream, in its token ids but
    not its text (vLLM's default); before
    min_tokens, neither it nor the end-of-sequence token is drawn (past a memory swap too); with
    ignore_eos, the end-of-sequence token listed as a stop token still ends the stream."""
    retrieval = FakeRetrieval(memories)
    body = prompts(1, text_codec)[0]
    eos, x = text_codec.eos_id, text_codec.encode("x")[0]
    to_eos, to_x = (SamplingParams(logit_bias=((t, 100.0),)) for t in (eos, x))
    asks = {"eos after 70": GenerationRequest(body, 90, sampling=to_eos, min_tokens=70),
            "x after 3": GenerationRequest(body, 40, sampling=to_x, stop_token_ids=(x,), min_tokens=3,
                                           use_memory=False),
            "x, no stop": GenerationRequest(body, 20, sampling=to_x, use_memory=False),
            "eos listed": GenerationRequest(body, 20, sampling=to_eos, ignore_eos=True, stop_token_ids=(eos,),
                                            use_memory=False)}

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=4))
        await engine.start()
        try:
            return dict(zip(asks, await asyncio.gather(*[collect(engine, r) for r in asks.values()]), strict=True))
        finally:
            await engine.close()

    got = run(main())
    with torch.inference_mode():
        assert got["eos after 70"][0] == reference_tokens(tiny_model, body, retrieval.provider, prefix, 90, eos,
                                                          lead=8, sampling=to_eos, min_tokens=70)
        assert got["x after 3"][0] == reference_tokens(tiny_model, body, None, [], 40, eos, sampling=to_x,
                                                       stop_ids=(x,), min_tokens=3)
    tokens, text, events = got["eos after 70"]  # listed and counted (as vLLM does), never spelled
    assert len(tokens) == 71 and eos not in tokens[:70] and tokens[70] == eos and text == text_codec.decode(tokens[:70])
    assert events[-1].finish_reason == "stop" and events[-1].usage.completion_tokens == 71
    tokens, text, events = got["x after 3"]
    assert len(tokens) == 4 and x not in tokens[:3] and tokens[3] == x and text == text_codec.decode(tokens[:3])
    assert events[-1].finish_reason == "stop" and events[-1].usage.completion_tokens == 4
    assert got["x, no stop"][0] == [x] * 20 and got["x, no stop"][2][-1].finish_reason == "length"
    assert got["eos listed"][0] == [eos] and got["eos listed"][2][-1].finish_reason == "stop"


def test_the_end_of_sequence_token_is_counted_whether_or_not_logprobs_are_asked(tiny_model, text_codec):
    """It was listed, and counted in `completion_tokens`, only with logprobs: one answer, two usages."""
    body = prompts(1, text_codec)[0]
    eos = text_codec.eos_id
    ends = SamplingParams(logit_bias=((eos, 100.0),))
    replies = [collect_alone(GenerationEngine(tiny_model, text_codec, None, EngineConfig()),
                             GenerationRequest(body, 20, sampling=ends, min_tokens=2, use_memory=False, logprobs=k))
               for k in (None, 0)]
    for tokens, text, events in replies:
        assert len(tokens) == 3 and tokens[2] == eos and events[-1].usage.completion_tokens == 3
        assert text == text_codec.decode(tokens[:2])
    assert replies[0][0] == replies[1][0]


@pytest.mark.parametrize(("stop", "min_tokens", "always", "expected"), [
    ("a", 4, False, (5, "aaaa")),  # looked for in the text after the first 4 tokens, as vLLM does
    ("aa", 4, False, (5, "aaa")),  # one that ends there is found, though it begins before
    ("a", 0, False, (1, "")),
    ("a", 4, True, (1, "")),  # a chat template's turn end ends it before min_tokens too
])
def test_no_stop_string_ends_a_stream_before_its_min_tokens(tiny_model, text_codec, stop, min_tokens, always,
                                                            expected):
    body = prompts(1, text_codec)[0]
    to_a = SamplingParams(logit_bias=((text_codec.encode("a")[0], 100.0),))
    tokens, text, events = collect_alone(
        GenerationEngine(tiny_model, text_codec, None, EngineConfig()),
        GenerationRequest(body, 20, sampling=to_a, stop=(stop,), stop_always=(stop,) if always else (),
                          min_tokens=min_tokens, use_memory=False))
    assert (len(tokens), text, events[-1].finish_reason) == (*expected, "stop")


def test_min_tokens_and_stop_token_ids_are_judged_against_the_request(tiny_model, text_codec):
    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig())
    body = prompts(1, text_codec)[0]
    for fields, says in [({"min_tokens": 11}, "min_tokens must be in 0..max_tokens (10), got 11: raise max_tokens too"),
                         ({"min_tokens": -1}, "min_tokens must be in 0..max_tokens (10), got -1"),
                         ({"stop_token_ids": (5, 259)}, "stop_token_ids: token id 259 is outside"),
                         ({"stop_token_ids": tuple(range(65))}, "stop_token_ids: at most 64")]:
        with pytest.raises(InvalidInput) as refused:
            engine.validate(GenerationRequest(body, 10, **fields))
        assert says in str(refused.value)
    engine.validate(GenerationRequest(body, 10, min_tokens=10, stop_token_ids=tuple(range(64))))


def test_logprobs_are_the_models_own_for_each_generated_token(tiny_model, text_codec):
    """Each token's logprob and its alternatives' are the model's log-softmax over the tokenizer's ids,
    before the penalty and temperature that shaped the draw; a stream that does not ask gets none."""
    body = prompts(1, text_codec)[0]
    sampling = SamplingParams(temperature=1.5, seed=4, frequency_penalty=2.0)

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=3))
        await engine.start()
        try:
            return await asyncio.gather(*[
                collect(engine, GenerationRequest(body, 30, sampling=sampling, use_memory=False, logprobs=k,
                                                  ignore_eos=True))
                for k in (3, 0, None)])
        finally:
            await engine.close()

    (tokens, _, events), (none_top, _, none_events), (_, _, without) = run(main())
    reported = [lp for e in events for lp in e.logprobs]
    assert [lp.token_id for lp in reported] == tokens and len(tokens) == 30
    with torch.inference_mode():
        ids = torch.tensor([[*body, *tokens]])
        logits = tiny_model(ids, rope_positions(torch.arange(ids.shape[1])[None], 0, tiny_model.config.ref_len))
    expected = logits[0, len(body) - 1 : -1, :259].log_softmax(-1)  # (30, vocab): row j predicts token j
    for j, lp in enumerate(reported):
        assert lp.logprob == pytest.approx(float(expected[j, tokens[j]]), abs=1e-4)
        top = expected[j].topk(3)
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert none_top == tokens and all(lp.top == [] for e in none_events for lp in e.logprobs)
    assert all(not e.logprobs for e in without)


@pytest.mark.parametrize("prefill_tokens", [0, 64])
def test_prompt_logprobs_score_every_prompt_token_after_the_first(tiny_model, text_codec, prefill_tokens):
    """Read in one pass or in shares, each prompt token's logprob is the model's given the tokens before
    it; max_tokens 0 reads and scores the prompt and generates nothing, and a stream that does not
    score, read beside them, generates as before."""
    body = prompts(4, text_codec)[3]  # 121 tokens: shares of 64 split it
    other = prompts(2, text_codec)[1]

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=3,
                                                                             prefill_tokens=prefill_tokens))
        await engine.start()
        try:
            return await asyncio.gather(
                engine.complete(GenerationRequest(body, 0, use_memory=False, prompt_logprobs=2)),
                engine.complete(GenerationRequest(body, 5, use_memory=False, prompt_logprobs=0, logprobs=1)),
                collect(engine, GenerationRequest(other, 20, use_memory=False)))
        finally:
            await engine.close()

    scored, both, (tokens, _, _) = run(main())
    with torch.inference_mode():
        ids = torch.tensor([body])
        logits = tiny_model(ids, rope_positions(torch.arange(len(body))[None], 0, tiny_model.config.ref_len))
        expected = logits[0, :-1, :259].log_softmax(-1)  # (len - 1, vocab): row j scores token j + 1
        assert tokens == reference_tokens(tiny_model, other, None, [], 20, text_codec.eos_id)
    assert scored.token_ids == [] and scored.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert [t.token_id for t in scored.prompt_logprobs] == body[1:]
    for j, t in enumerate(scored.prompt_logprobs):
        assert t.logprob == pytest.approx(float(expected[j, body[j + 1]]), abs=1e-4)
        assert [i for i, _ in t.top] == expected[j].topk(2).indices.tolist()
    assert [t.logprob for t in both.prompt_logprobs] == pytest.approx([t.logprob for t in scored.prompt_logprobs],
                                                                     abs=1e-5)
    assert all(t.top == [] for t in both.prompt_logprobs) and len(both.token_ids) == len(both.logprobs) == 5


def test_prompt_logprobs_with_memory_are_the_same_read_in_shares_or_at_once(tiny_model, text_codec, memories):
    """Each share reads its own chunks' memories: scores match a pass over the whole prompt."""
    body = prompts(4, text_codec)[3]

    async def score(prefill_tokens):
        engine = GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories),
                                  EngineConfig(max_batch=2, prefill_tokens=prefill_tokens))
        await engine.start()
        try:
            return await engine.complete(GenerationRequest(body, 0, prompt_logprobs=0))
        finally:
            await engine.close()

    whole, shared = run(score(0)), run(score(64))
    plain = run(_plain_scores(tiny_model, text_codec, body))
    assert len(whole.prompt_logprobs) == len(body) - 1 and whole.citations
    assert [t.logprob for t in shared.prompt_logprobs] == pytest.approx([t.logprob for t in whole.prompt_logprobs],
                                                                       abs=1e-4)
    assert [t.logprob for t in whole.prompt_logprobs] != pytest.approx(plain, abs=1e-3)  # the memories count


def test_with_memory_a_prompt_tokens_score_depends_on_the_tokens_before_it_alone(tiny_model, text_codec, prefix,
                                                                                memories, monkeypatch):
    """Each scored chunk reads what the chunk before it retrieved: a prompt whose last token differs
    scores every token before it the same. Generating after the scores does not change them, and an
    unscored prompt still reads its own chunks' memories."""
    body = prompts(4, text_codec)[3]  # 121 tokens, two chunks
    other = [*body[:-1], (body[-1] + 1) % 250 + 3]

    class ByChunk(FakeRetrieval):
        """The last chunk of `body` retrieves memories 0-2, its first 3-5, any other query 6-8."""

        def pick(self, query, k):
            start = 0 if query == body[64:] else 3 if query == body[:64] else 6
            return list(range(start, start + 3))

    retrieval = ByChunk(memories)

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=2))
        await engine.start()
        try:
            return [await engine.complete(r) for r in (
                GenerationRequest(body, 0, prompt_logprobs=0), GenerationRequest(other, 0, prompt_logprobs=0),
                GenerationRequest(body, 70, prompt_logprobs=0), GenerationRequest(body, 70))]
        finally:
            await engine.close()

    installed = []
    original_install = engine_module.Transformer.install_memories

    def install(self, row, chosen):
        installed.append(list(chosen))
        original_install(self, row, chosen)

    monkeypatch.setattr(engine_module.Transformer, "install_memories", install)
    scored, changed, scored_then_generated, generated = run(main())
    last_chunk_own = memories[:3]
    assert any(len(m) == len(last_chunk_own) and all(a is b for a, b in zip(m, last_chunk_own, strict=True))
               for m in installed)  # the first generated chunk reads what the last prompt chunk retrieved
    assert (scored.usage.retrievals, scored.usage.memories_read) == (1, 3)  # scored alone: the first chunk's
    assert scored_then_generated.usage.memories_read == generated.usage.memories_read  # the same memories read
    assert [t.logprob for t in changed.prompt_logprobs[:-1]] == pytest.approx(
        [t.logprob for t in scored.prompt_logprobs[:-1]], abs=1e-5)
    assert changed.prompt_logprobs[-1].logprob != pytest.approx(scored.prompt_logprobs[-1].logprob)
    assert [t.logprob for t in scored_then_generated.prompt_logprobs] == pytest.approx(
        [t.logprob for t in scored.prompt_logprobs], abs=1e-5)
    assert len(scored_then_generated.token_ids) == 70 or scored_then_generated.finish_reason == "stop"
    with torch.inference_mode():
        assert generated.token_ids == reference_tokens(tiny_model, body, retrieval.provider, prefix, 70,
                                                       text_codec.eos_id, lead=8)


async def _plain_scores(model, codec, body):
    engine = GenerationEngine(model, codec, None, EngineConfig(max_batch=1))
    await engine.start()
    try:
        return [t.logprob for t in (await engine.complete(GenerationRequest(body, 0, use_memory=False,
                                                                            prompt_logprobs=0))).prompt_logprobs]
    finally:
        await engine.close()


def test_bad_requests_are_refused_with_what_to_fix(tiny_model, text_codec, memories):
    async def main():
        engine = GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories), EngineConfig(max_batch=2))
        await engine.start()
        try:
            body = prompts(1, text_codec)[0]
            cases = [
                (GenerationRequest([text_codec.bos_id], 5), "empty"),
                (GenerationRequest(body, 0), "max_tokens must be >= 1"),
                (GenerationRequest(body, 10**6), "does not fit"),
                (GenerationRequest([text_codec.bos_id, 10**6], 5), "outside the tokenizer"),
                (GenerationRequest([text_codec.bos_id] * 5000, 5), "shorten it"),
                (GenerationRequest(body, 5, logprobs=21), r"logprobs: the alternatives to report per token are 0..20"),
                (GenerationRequest(body, 5, prompt_logprobs=-1), r"prompt_logprobs: the alternatives to report"),
                (GenerationRequest(body, 0, logprobs=3), r"max_tokens must be >= 1 \(0 only to score a prompt\)"),
                (GenerationRequest(body, 5, sampling=SamplingParams(logit_bias=((259, 1.0),))),
                 r"logit_bias: token id 259 is outside the tokenizer's vocabulary \(0..258\)"),
            ]
            for request, message in cases:
                with pytest.raises(InvalidInput, match=message):
                    await collect(engine, request)
            assert engine.accepted == 0
        finally:
            await engine.close()

    run(main())


@pytest.mark.parametrize("policy", ["fail", "continue"])
def test_retrieval_outage_policy(tiny_model, text_codec, memories, policy):
    async def main():
        engine = GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories, fail=True),
                                  EngineConfig(retrieval_policy=policy))
        await engine.start()
        try:
            return await collect(engine, GenerationRequest(prompts(1, text_codec)[0], 4))
        finally:
            await engine.close()

    if policy == "fail":
        with pytest.raises(Unavailable):
            run(main())
    else:
        tokens, _, events = run(main())
        assert len(tokens) == 4
        assert any("without memory" in w for e in events for w in e.warnings)


class CorruptFetch(FakeRetrieval):
    """References are found; their memories fail validation (as the memory service says it)."""

    async def fetch(self, ids):
        from memory3.services.rpc.errors import DataLoss

        raise DataLoss(f"release 'r': the memory bank has 1 corrupt and 0 missing memories ({ids[0]})")


@pytest.mark.parametrize("policy", ["fail", "continue"])
def test_a_corrupt_memory_is_for_the_retrieval_policy(tiny_model, text_codec, memories, policy):
    """It failed every request that retrieved it, under "continue" too: one bad blob in the bank, a lasting
    outage for the requests that touch it. Under "continue" the chunk reads no memory, and the reply says
    why; under "fail" the request fails DATA_LOSS, as before."""
    from memory3.services.rpc.errors import DataLoss

    request = GenerationRequest(prompts(1, text_codec)[0], 70)  # past a chunk: a generated chunk's swap too
    engine = GenerationEngine(tiny_model, text_codec, CorruptFetch(memories), EngineConfig(retrieval_policy=policy))
    if policy == "fail":
        with pytest.raises(DataLoss, match="1 corrupt"):
            collect_alone(engine, request)
        return
    tokens, _, events = collect_alone(engine, request)
    warnings = [w for e in events for w in e.warnings]
    assert len(tokens) == 70 and len(warnings) >= 2
    assert warnings[0].startswith("a memory failed validation (release 'r': the memory bank has 1 corrupt")
    assert warnings[0].endswith("; generated without memory") and "chunk 1 generated without memory" in warnings[1]


def test_stop_strings_end_the_stream_and_are_not_returned(tiny_model, text_codec, memories):
    body = prompts(1, text_codec)[0]

    def generate(stop):
        return collect_alone(GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories)),
                             GenerationRequest(body, 40, stop=stop))

    def counted(reason):
        """Successes for `reason`, and requests in the end-to-end latency histogram."""
        latencies = next(s.value for m in metrics.E2E_REQUEST_LATENCY.collect() for s in m.samples
                         if s.name.endswith("_count"))
        return metrics.REQUEST_SUCCESS.labels(finished_reason=reason)._value.get(), latencies

    tokens, full, _ = generate(())
    assert len(full) >= 30 and len(tokens) == 40
    for start, length in [(5, 2), (3, 1), (10, 4), (20, 7)]:  # one byte a token: spans up to 7 tokens
        stop = full[start:start + length]
        (stops, latencies) = counted("stop")
        _, text, events = generate((stop, "\x00never"))
        assert text == full[: full.index(stop)], stop
        assert events[-1].finish_reason == "stop"
        assert counted("stop") == (stops + 1, latencies + 1)  # a success, as one ended by the stop token
    # Text that could begin a stop string is held back, and sent when the stream ends otherwise.
    _, text, events = generate((full[-3:] + "\x00",))
    assert text == full and events[-1].finish_reason == "length"


@pytest.mark.parametrize(("lead", "paused"), [(0, True), (40, False)])
def test_memory_wait_measures_the_pause_that_the_lead_avoids(tiny_model, text_codec, memories, monkeypatch,
                                                             lead, paused):
    """Retrieval slower than one step pauses the stream at the chunk boundary, unless it started early."""
    forward = tiny_model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", slow_forward)
    retrieval = FakeRetrieval(memories, delay=0.02)  # retrieve, then fetch: 40 ms; 40 steps take >= 200 ms
    body = prompts(1, text_codec)[0]

    def observed():
        samples = {s.name: s.value for m in metrics.MEMORY_WAIT.collect() for s in m.samples}
        return samples["memory3_memory_wait_seconds_count"], samples["memory3_memory_wait_seconds_sum"]

    before = observed()

    engine = GenerationEngine(tiny_model, text_codec, retrieval, EngineConfig(max_batch=1, retrieval_lead_tokens=lead))
    tokens, _, _ = collect_alone(engine, GenerationRequest(body, 70, ignore_eos=True))
    swaps, waited = (a - b for a, b in zip(observed(), before, strict=True))
    assert len(tokens) == 70 and swaps == 1
    assert (waited > 0.01) if paused else (waited == 0.0)


def test_the_scheduler_threads_cpu_time_is_counted(tiny_model, text_codec, memories):
    """The serving bench splits the decoder's CPU into the scheduler's and the rest with this counter."""
    before = metrics.SCHEDULER_CPU._value.get()
    engine = GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories), EngineConfig(max_batch=2))
    start = time.process_time()
    tokens, _, _ = collect_alone(engine, GenerationRequest(prompts(1, text_codec)[0], 40, ignore_eos=True))
    spent = time.process_time() - start
    assert len(tokens) == 40
    counted = metrics.SCHEDULER_CPU._value.get() - before
    assert 0 < counted <= spent + 0.01  # the process's CPU includes the scheduler thread's


def test_every_steps_token_ids_go_out_at_once_even_inside_a_character(tiny_model, text_codec, memories):
    """Random weights emit bytes that split UTF-8 characters: their ids still stream one step at a time."""
    engine = GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories), EngineConfig(max_batch=2))
    tokens, text, events = collect_alone(engine, GenerationRequest(prompts(1, text_codec)[0], 120, ignore_eos=True))
    with_ids = [e for e in events if e.token_ids]
    assert [len(e.token_ids) for e in with_ids] == [1] * len(tokens)  # one message per decode step
    held = [e for e in with_ids if not e.text]
    assert held  # some tokens ended inside a character: their ids went out, their text waited
    assert text == "".join(e.text for e in events)


def test_the_waiting_gauge_counts_only_streams_without_a_row(tiny_model, text_codec):
    """The autoscaler and the backlog alert read `memory3_num_requests_waiting`: a stream stops
    counting as waiting once it has a row, not only when some other request comes or ends."""
    bodies = prompts(3, text_codec)

    def gauges():
        return metrics.NUM_REQUESTS_RUNNING._value.get(), metrics.NUM_REQUESTS_WAITING._value.get()

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=2, max_waiting=4))
        await engine.start()
        try:
            streams = [engine.generate(GenerationRequest(body, engine.max_seq_len - len(body), use_memory=False,
                                                         ignore_eos=True)) for body in bodies]
            await asyncio.gather(*(anext(s) for s in streams[:2]))  # accepted together, then both given rows
            running = gauges()
            third = asyncio.ensure_future(anext(streams[2]))
            await asyncio.sleep(0.01)  # accepted; no row is free
            queued = gauges()
            await streams[0].aclose()  # frees a row for the third
            await third
            admitted = gauges()
            for s in streams[1:]:
                await s.aclose()
            return running, queued, admitted
        finally:
            await engine.close()

    running, queued, admitted = run(main())
    assert running == (2, 0)
    assert queued == (2, 1)
    assert admitted == (2, 0)


def test_complete_joins_the_streams_events_into_one(tiny_model, text_codec, memories):
    body = prompts(1, text_codec)[0]
    request = GenerationRequest(body, 40, stop=())

    async def both():
        engine = GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories))
        await engine.start()
        try:
            return await collect(engine, request), await engine.complete(request)
        finally:
            await engine.close()

    (tokens, text, events), whole = run(both())
    assert len(events) > 1  # several events were joined
    assert whole.token_ids == tokens and whole.text == text
    assert whole.citations == [c for e in events for c in e.citations] and whole.citations
    assert (whole.finish_reason, whole.usage) == (events[-1].finish_reason, events[-1].usage)


def test_messages_for_a_closed_event_loop_are_dropped_not_fatal_to_the_scheduler(tiny_model, text_codec):
    """A server whose event loop ended before the engine's scheduler thread: that thread's next
    hand-over raised RuntimeError and died with a traceback."""
    from types import SimpleNamespace

    closed = asyncio.new_event_loop()
    closed.close()
    scheduler = GenerationEngine(tiny_model, text_codec, None).scheduler
    scheduler.outbox = [(SimpleNamespace(loop=closed), object())]
    scheduler._send_outbox()
    assert scheduler.outbox == []


def test_a_seeded_request_samples_with_a_generator_on_the_models_device(tiny_model, text_codec, monkeypatch):
    """A CPU generator with a GPU model's logits raised in the scheduler's step, failing every stream of
    the batch (tests/unit/test_gpu.py runs it on CUDA); here: the generator is made for the model's device,
    and a seed gives the same tokens twice."""
    devices, real = [], torch.Generator

    def recording(*args, **kwargs):
        if sys._getframe(1).f_globals["__name__"] == engine_module.__name__:
            devices.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "Generator", recording)
    body = prompts(1, text_codec)[0]
    request = GenerationRequest(body, 12, SamplingParams(temperature=0.9, seed=7), use_memory=False)

    def tokens():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=2))
        return collect_alone(engine, request)[0]

    first, second = tokens(), tokens()
    assert first == second and len(first) == 12
    assert devices == [tiny_model.output.weight.device] * 2


def test_model_passes_that_keep_failing_make_the_engine_not_ready_for_a_while(tiny_model, text_codec, monkeypatch):
    """The scheduler failed each batch and went on: a decoder whose every pass raised still said SERVING."""
    monkeypatch.setattr(engine_module, "FAILING_FOR_S", 0.5)
    body = prompts(1, text_codec)[0]

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a model pass")

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=2))
        await engine.start()
        try:
            with monkeypatch.context() as patched:
                patched.setattr(tiny_model, "forward", broken)
                for _ in range(engine_module.FAILING_STEPS):
                    assert engine.failing() is None
                    with pytest.raises(engine_module.ServiceError, match="internal error in the decoder"):
                        await collect(engine, GenerationRequest(body, 4, use_memory=False))
                failing, dead = engine.failing(), engine.dead()
            await asyncio.sleep(0.6)
            sound_again = engine.failing()
            tokens, _, _ = await collect(engine, GenerationRequest(body, 4, use_memory=False))
            return failing, dead, sound_again, tokens, engine.scheduler.failed_steps
        finally:
            await engine.close()

    failing, dead, sound_again, tokens, failed_steps = run(main())
    assert failing == "the last 3 scheduler steps failed" and dead is None
    assert sound_again is None and len(tokens) == 4 and failed_steps == 0


@pytest.mark.parametrize("fault", ["device", "stuck"])
def test_a_device_fault_or_a_stuck_pass_makes_the_engine_dead(tiny_model, text_codec, monkeypatch, fault):
    """Nothing but a restart brings back a CUDA context after an illegal memory access, or a device that
    hangs in a kernel: the decoder must say it is not live."""
    import threading

    body = prompts(1, text_codec)[0]
    gate = threading.Event()

    def failed(*args, **kwargs):
        if fault == "device":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        gate.wait(10)
        raise RuntimeError("released")

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=2, stall_s=0.3))
        await engine.start()
        try:
            assert engine.dead() is None
            with monkeypatch.context() as patched:
                patched.setattr(tiny_model, "forward", failed)
                request = asyncio.ensure_future(collect(engine, GenerationRequest(body, 4, use_memory=False)))
                await asyncio.sleep(0.6)
                dead = engine.dead()
                gate.set()
                with pytest.raises(engine_module.ServiceError):
                    await request
            await asyncio.sleep(0.1)
            assert engine.dead() == dead  # for good: the pass that ended after all proves nothing
            return dead
        finally:
            gate.set()
            await engine.close()

    dead = run(main())
    expected = ("the device failed (RuntimeError: CUDA error" if fault == "device"
                else "the scheduler has been in one step")
    assert dead is not None and dead.startswith(expected), dead


def test_every_failed_request_is_counted_once_by_its_code(tiny_model, text_codec, memories, monkeypatch):
    """Only the scheduler counted failures: a retrieval outage under the fail policy, a corrupt memory
    or a refusal at capacity failed the request uncounted, and the error-ratio alert never fired."""
    body = prompts(1, text_codec)[0]
    codes = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL")
    before = {code: failures(code) for code in codes}

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a model pass")

    async def main():
        down = GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories, fail=True),
                                EngineConfig(max_batch=1, max_waiting=0))
        await down.start()
        try:
            with pytest.raises(Unavailable):
                await collect(down, GenerationRequest(body, 4))
            hold = asyncio.ensure_future(collect(down, GenerationRequest(body, 400, use_memory=False)))
            await asyncio.sleep(0.2)
            with pytest.raises(ResourceExhausted):
                await collect(down, GenerationRequest(body, 4, use_memory=False))
            hold.cancel()
            with monkeypatch.context() as patched:
                patched.setattr(tiny_model, "forward", broken)
                with pytest.raises(engine_module.ServiceError, match="internal error"):
                    await collect(down, GenerationRequest(body, 4, use_memory=False))
        finally:
            await down.close()

    run(main())
    assert {code: failures(code) - before[code] for code in codes} == dict.fromkeys(codes, 1)


def test_a_stop_string_the_last_token_completes_is_counted_as_the_client_is_told(tiny_model, text_codec,
                                                                                  monkeypatch):
    """The scheduler counted `length` (its last allowed token), while the client was told `stop`."""
    script = text_codec.encode("abc")
    monkeypatch.setattr(engine_module.Scheduler, "_pick",
                        staticmethod(lambda streams, logits: [script[len(s.tokens)] for s in streams]))

    before = successes("stop"), successes("length")
    engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=2))
    tokens, text, events = collect_alone(engine, GenerationRequest(prompts(1, text_codec)[0], 3, stop=("c",),
                                                                    use_memory=False))
    assert text == "ab" and events[-1].finish_reason == "stop"
    assert (successes("stop") - before[0], successes("length") - before[1]) == (1, 0)


def test_a_deadline_that_passes_in_the_queue_says_so(tiny_model, text_codec):
    """A request whose deadline passed while it waited for a row was told it passed "while generating"."""
    from memory3.services.rpc.errors import DeadlineExceeded

    body = prompts(1, text_codec)[0]

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=1))
        await engine.start()
        try:
            busy = engine.generate(GenerationRequest(body, 400, use_memory=False))
            await busy.__anext__()  # holds the only row
            late = GenerationRequest(body, 4, use_memory=False, deadline=time.monotonic() + 0.2)
            with pytest.raises(DeadlineExceeded) as expired:
                await collect(engine, late)
            await busy.aclose()
            return str(expired.value)
        finally:
            await engine.close()

    assert run(main()) == "the request's deadline passed while it waited for a batch row"


def test_a_request_its_client_leaves_is_counted_as_an_abort(tiny_model, text_codec):
    """A hang-up or a cancel ended a request uncounted: only finished and failed ones were."""
    body = prompts(1, text_codec)[0]
    before = successes("abort")

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=2))
        await engine.start()
        try:
            left = engine.generate(GenerationRequest(body, 400, use_memory=False))
            await left.__anext__()
            await left.aclose()  # the client hung up mid-stream
            whole = engine.generate(GenerationRequest(body, 2, use_memory=False))
            async for event in whole:
                if event.finish_reason is not None:
                    break  # the answer is complete: leaving now is no abort
            await whole.aclose()
        finally:
            await engine.close()

    run(main())
    assert successes("abort") - before == 1


def test_a_request_ended_by_a_bug_is_counted_as_internal(tiny_model, text_codec):
    class BrokenFetch(FakeRetrieval):
        async def fetch(self, ids):
            raise KeyError("a bug")

    before = failures("INTERNAL")

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, BrokenFetch({}), EngineConfig(max_batch=1))
        await engine.start()
        try:
            with pytest.raises(KeyError):
                await collect(engine, GenerationRequest(prompts(1, text_codec)[0], 4))
        finally:
            await engine.close()

    run(main())
    assert failures("INTERNAL") - before == 1


def test_a_request_cut_at_its_deadline_is_counted_as_one_whoever_notices_first(tiny_model, text_codec):
    """gRPC cancels a call at its deadline, often before the scheduler ends the stream: it was an abort."""
    def counts():
        return failures("DEADLINE_EXCEEDED"), successes("abort")

    body = prompts(1, text_codec)[0]
    before = counts()

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, None, EngineConfig(max_batch=1))
        await engine.start()
        try:
            late = engine.generate(GenerationRequest(body, 400, use_memory=False, deadline=time.monotonic() + 0.1))
            await late.__anext__()
            await asyncio.sleep(0.15)
            await late.aclose()  # the server's handler, cancelled at the deadline
        finally:
            await engine.close()

    run(main())
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)


class HangsOnGeneratedChunks:
    """Answers the prompt's retrieval and every fetch; a generated chunk's retrieval hangs until cancelled."""

    def __init__(self, memories):
        self.memories, self.calls, self.cancelled = memories, 0, 0

    async def retrieve(self, queries, top_k, include_text):
        self.calls += 1
        if self.calls > 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return [[RetrievedReference("ref-0", 1.0)] for _ in queries]

    async def fetch(self, ids):
        return [self.memories[0] for _ in ids]


def test_a_generated_chunks_retrieval_ends_with_its_request(tiny_model, text_codec, memories):
    """A client that hangs up (or whose deadline passes) ended its stream, but the retrieval for its
    next chunk went on, merged call and RPC included, for nobody."""
    from memory3.services.decoder.retrieval import CoalescingRetrieval

    inner = HangsOnGeneratedChunks(memories)
    engine = GenerationEngine(tiny_model, text_codec, CoalescingRetrieval(inner, window_s=0.001),
                              EngineConfig(max_batch=1, retrieval_lead_tokens=8))

    async def main():
        await engine.start()
        try:
            async def client():
                async for _ in engine.generate(GenerationRequest(prompts(1, text_codec)[0], 200, ignore_eos=True)):
                    pass

            stream = asyncio.ensure_future(client())
            deadline = time.monotonic() + 30
            while inner.calls < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert inner.calls == 2, "the generated chunk's retrieval never started"
            stream.cancel()  # the client hangs up
            await asyncio.gather(stream, return_exceptions=True)
            for _ in range(100):
                if inner.cancelled:
                    break
                await asyncio.sleep(0.01)
            return inner.cancelled, engine.accepted
        finally:
            await engine.close()

    assert run(main()) == (1, 0)


def test_an_engine_without_retrieval_leaves_a_prompt_the_room_of_the_prefix(tiny_model, text_codec, memories):
    """It kept room for the reference prefix, which only a stream that reads memories puts in its row:
    a prompt that fitted was refused, and a default max_tokens was that much shorter."""
    without = GenerationEngine(tiny_model, text_codec, None, EngineConfig())
    with_retrieval = GenerationEngine(tiny_model, text_codec, FakeRetrieval(memories), EngineConfig())
    body = [text_codec.bos_id] + [65] * (without.max_seq_len - 8)
    assert without.room(body, True) == without.room(body, False) == 7
    assert with_retrieval.room(body, True) == 7 - len(with_retrieval.prefix) and with_retrieval.prefix
    without.validate(GenerationRequest(body, 7))
    with pytest.raises(InvalidInput, match=f"context holds {without.max_seq_len - len(with_retrieval.prefix) - 1} "
                                           "prompt tokens at most: shorten it"):
        with_retrieval.validate(GenerationRequest(body, 7))


@pytest.mark.parametrize("use_memory", [True, False])
def test_a_stream_whose_logits_turn_nan_fails_alone_and_its_row_serves_the_next_stream_exactly(
        tiny_model, text_codec, prefix, memories, use_memory):
    """A pass that overflows in one row (here: a NaN written into that row's values, as an overflow
    would leave it) gives that row NaN logits. The stream fails with INTERNAL and says why; the
    stream beside it is untouched; and the next stream in that row, shorter than the NaN's slot,
    reads none of it: masked slots weigh 0, and 0 × NaN is NaN, so the row must be cleared. The
    passes are those of fixed shapes (`cuda_graphs`, run eagerly here), which attend over a context
    bucket: masked slots past a row's context included."""
    retrieval = FakeRetrieval(memories)
    short, _, long = prompts(3, text_codec)
    neighbour = prompts(2, text_codec)[1]
    before = failures("INTERNAL")

    async def main():
        engine = GenerationEngine(tiny_model, text_codec, retrieval,
                                  EngineConfig(max_batch=2, max_waiting=0, cuda_graphs=True))
        await engine.start()
        scheduler = engine.scheduler
        real_passes = scheduler.passes

        class Overflowing:
            steps = 0

            def __getattr__(self, name):
                return getattr(real_passes, name)

            def __call__(self, fed, positions, at):
                self.steps += 1
                victim = scheduler.rows[0]
                if self.steps == 4 and victim is not None and not victim.prefilling:
                    cache = tiny_model.layers[0].attention.kv_cache
                    cache.v[0, :, cache.mem_slots + victim.next_slot - 1] = float("nan")  # the slot the step reads
                return real_passes(fed, positions, at)

        scheduler.passes = Overflowing()
        try:
            results = await asyncio.gather(
                collect(engine, GenerationRequest(long, 30, use_memory=use_memory, ignore_eos=True)),
                collect(engine, GenerationRequest(neighbour, 30, use_memory=use_memory, ignore_eos=True)),
                return_exceptions=True)
            scheduler.passes = real_passes
            after = await collect(engine, GenerationRequest(short, 20, use_memory=use_memory, ignore_eos=True))
            return results, after
        finally:
            await engine.close()

    (broken, beside), (tokens, _, _) = run(main())
    assert isinstance(broken, engine_module.ServiceError) and "NaN or inf" in str(broken)
    assert broken.code.name == "INTERNAL" and failures("INTERNAL") - before == 1
    provider = retrieval.provider if use_memory else None
    with torch.inference_mode():
        assert beside[0] == reference_tokens(tiny_model, neighbour, provider, prefix, 30, text_codec.eos_id, 8)[:30]
        assert tokens == reference_tokens(tiny_model, short, provider, prefix, 20, text_codec.eos_id, 8)[:20]
