"""Decoding with static shapes: one decode step captured in a CUDA graph and replayed.

`Transformer.forward` decodes with shapes that follow the context (the key axis grows by one slot
per token, masks are built per pass). That is right for prefill and for the CPU, but a CUDA graph
replays fixed kernels on fixed addresses, and at batch 1 a 44-layer model spends more time
launching ~1,200 small kernels than reading its weights. Here every decode step has the same shapes:

    keys at a memory layer:  [memory slots (M) | context slots (S)]  (B, H_kv, M + S, D)
    keys at other layers:    [context slots (S)]                     (B, H_kv, S, D)

Every row attends over the whole cache; an additive mask (0 / -inf), rebuilt inside the step from
the rows' current slots into a preallocated buffer, hides what a row may not see yet. Inputs
(tokens, slots) live in static tensors that the step reads and the caller overwrites. On CUDA the
step is captured once with `torch.cuda.CUDAGraph` and replayed; on the CPU the same step runs eagerly.

Memory swaps (every `chunk_len` generated tokens) write into the memory slots in place, so the
graph never sees a new address: the fetched memories (ideally in pinned host memory) are copied to a
device staging buffer on a side stream while the current step computes, and the next step waits on
an event, then moves them into the slots. The retrieval query is the last `chunk_len` generated
tokens, which are known one step before the memories are first read, so the copy overlaps one step.

A graph removes the CPU's launch cost, not the GPU's: each small kernel still runs for a few
microseconds, and at batch 1 a block's ~26 of them outlast its 5 matrix products. `compile=True`
runs each block through `torch.compile` (Inductor), which fuses them into a few kernels. At batch 1
a matrix product has one row, a matrix-vector product that cuBLAS runs well short of the memory
bandwidth; with coordinate-descent tuning on, Inductor rewrites it on GPUs as a Triton reduction,
which it can fuse with the norm before it and SwiGLU after it, and tunes each kernel's block sizes
on the device, as gpt-fast does. Larger batches keep cuBLAS.

Prefill runs `Transformer.forward` once per prompt, writing into the same caches. Eager, a prefill
of `paper-2.4b` is ~2,300 operator calls launched one by one, and at batch 1 the GPU waits on the
CPU for longer than it computes; so a prefill without explicit memories goes through static input
buffers too, captured in a CUDA graph per prompt shape at its first call (`static_prefill`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from .generate import GenerationOutput, MemoryProvider, SamplingParams, model_dtype, retrieve_memories, sample
from .layout import chunk_groups, chunk_spans, rope_positions
from .memory import ExplicitMemory, prime_slot_valid, stack_memories
from .model import Transformer, TransformerBlock, apply_rope

NEG_INF = float("-inf")
# Inductor options of the compiled step (see the module docstring). Tuning benchmarks each kernel's
# variants once, while the step warms up before the capture; Inductor caches the results on disk.
COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


class StaticDecoder:
    """A fixed batch of B rows decoding one token per step with static shapes.

    Args:
        model: the model; its weights are read, its caches are allocated here and lent to it
            for prefill only.
        batch_size: B, the rows of every step (all rows decode every step).
        max_seq_len: context slots per row (prefix + prompt + generated tokens).
        memory: reserve memory slots at the memory layers (the engine "with memory").
        prefix_len: length of the reference prefix; decoding RoPE positions skip `ref_len` after it.
        cuda_graph: capture the step in a CUDA graph; default: when the model is on CUDA.
        compile: run each block, and the step's embedding, masks and output head, through
            `torch.compile` (Inductor), which fuses norms, RoPE, cache writes, residual adds and
            SwiGLU into a few kernels; compiled here, before the capture, into one graph that all
            layers share.
        compile_options: Inductor options of the compiled step; default `COMPILE_OPTIONS`.
        static_prefill: prefill prompts through static input buffers, over the whole cache
            (`kv_len=max_seq_len`, so that nothing waits on the device), captured in a CUDA graph
            per prompt shape (B, T) with `cuda_graph`; default: with `cuda_graph`. Only without
            memory slots: explicit memories of a prompt change shape with its chunks.
    """

    def __init__(self, model: Transformer, batch_size: int, max_seq_len: int, *, memory: bool,
                 prefix_len: int = 0, cuda_graph: bool | None = None, compile: bool = False,
                 compile_options: dict | None = None, static_prefill: bool | None = None) -> None:
        config = model.config
        self.model, self.batch_size, self.prefix_len = model, batch_size, prefix_len
        self.max_seq_len = max_seq_len
        self.device, dtype = model.output.weight.device, model_dtype(model)
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            model.setup_caches(batch_size, max_seq_len, memory=memory)
            self.caches = [layer.attention.kv_cache for layer in model.layers]
            model.clear_caches()
        self.mem_slots = m = max(cache.mem_slots for cache in self.caches)  # M
        self.memory = m > 0
        b, s, dev = batch_size, max_seq_len, self.device
        # Static inputs: the token each row feeds and its context slot; the step advances the slots.
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)  # (B, 1)
        self.slots = torch.zeros(b, 1, dtype=torch.long, device=dev)  # (B, 1)
        self.logits = torch.zeros(b, config.vocab_size, dtype=dtype, device=dev)  # (B, V), output
        self.rows = torch.arange(b, device=dev)  # (B,)
        self.key_slot = torch.arange(s, device=dev)  # (S,)
        self.ctx_mask = _mask_buffer(b, s, dtype, dev)  # (B, 1, 1, S)
        self.mem_mask = _mask_buffer(b, m + s, dtype, dev)  # (B, 1, 1, M + S)
        self.mem_bias = torch.full((b, m), NEG_INF, dtype=dtype, device=dev)  # (B, M) resident memory slots
        # Memory staging: the next memories of each row, until the next step installs them.
        if self.memory:
            j, k = config.mems_per_chunk, config.mem_tokens_per_head
            shape = (b, j, config.n_memory_layers, config.n_kv_head, k, config.head_dim)
            self.stage_k = torch.zeros(shape, dtype=dtype, device=dev)  # (B, J, L_mem, H_kv, k, D)
            self.stage_v = torch.zeros(shape, dtype=dtype, device=dev)
            # Per row: which slots hold a memory token, then whether the row takes new memories.
            self.stage_meta = torch.zeros(b, m + 1, dtype=torch.bool, device=dev)  # (B, M + 1)
            self.meta_host = torch.zeros(b, m + 1, dtype=torch.bool, pin_memory=cuda)
            self._stage_views = [[(self.stage_k[i, jj], self.stage_v[i, jj]) for jj in range(j)] for i in range(b)]
        self._pending = False
        self._copy_stream = torch.cuda.Stream(dev) if cuda else None
        self._staged = torch.cuda.Event() if cuda else None
        self._installed = torch.cuda.Event() if cuda else None
        # dynamic: one graph serves every layer (the memory slot count is a dynamic int), batch size
        # above 1 and cache length; Dynamo specializes batch size 1 into its own graph.
        steps = (decode_prologue, decode_layer, decode_epilogue)
        self.compiled = compile
        if compile:
            options = COMPILE_OPTIONS if compile_options is None else compile_options
            steps = tuple(torch.compile(f, fullgraph=True, dynamic=True, options=options) for f in steps)
        self._prologue, self._layer, self._epilogue = steps
        self.graph: torch.cuda.CUDAGraph | None = None
        graphs = cuda_graph if cuda_graph is not None else cuda
        if static_prefill and self.memory:
            raise ValueError("static_prefill needs a decoder without memory slots (memory=False)")
        self.static_prefill = bool(graphs) and not self.memory if static_prefill is None else static_prefill
        self._prefills: dict[tuple[int, ...], _StaticPrefill] = {}  # by prompt shape (B, T)
        self.static_prefill_error: str | None = None
        if graphs:
            self._capture()
        elif compile:  # compile now, so that a compiler failure surfaces here as it does on CUDA
            self._forward()
            self.slots.zero_()

    # ---- the step ---------------------------------------------------------------------------
    def step(self, tokens: Tensor) -> Tensor:
        """Feed (B,) tokens at the rows' current slots -> (B, V) logits.

        The logits are a static buffer that the next step overwrites. Memories staged since the
        last step are installed first, so this step is the first to read them.
        """
        if self._pending:
            self._install()
        self.tokens[:, 0].copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self._forward()
        return self.logits

    @torch.inference_mode()
    def _forward(self) -> None:
        """The captured step: reads tokens, slots, caches and mem_bias; writes caches, logits, slots."""
        model, slots = self.model, self.slots
        x, cos, sin = self._prologue(model, self.tokens, slots, self.prefix_len, self.key_slot, self.ctx_mask,
                                     self.mem_mask if self.memory else None, self.mem_bias)
        ffn_out = torch.zeros_like(x)
        for layer, cache in zip(model.layers, self.caches, strict=True):
            mask = self.mem_mask if cache.mem_slots else self.ctx_mask
            x, ffn_out = self._layer(layer, cache.k, cache.v, cache.mem_slots, x, ffn_out, cos, sin, mask,
                                     self.rows, slots)
        self._epilogue(model, x, ffn_out, self.logits, slots)

    def _capture(self) -> None:
        self.graph, _ = capture_graph(self._forward, self.device, warmups=3)
        self.slots.zero_()  # warm-up advanced them; prefill sets them anyway

    # ---- prefill ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: Tensor, slots: Tensor, positions: Tensor, last: Tensor, memory=None,
                token_group: Tensor | None = None) -> Tensor:
        """Run (right-padded) prompts through `Transformer.forward` into this decoder's caches.

        Args:
            tokens, slots, positions: (B, T).
            last: (B,) slot of each row's last prompt token; decoding continues at last + 1.
            memory, token_group: the prompt chunks' memories, as `Transformer.forward` takes them.
        Returns:
            (B, V) logits of each row's last prompt token; with `static_prefill`, a static buffer
            that the next prefill of the same shape overwrites.
        """
        model = self.model
        model.attach_caches(self.caches)
        try:
            if self.memory:
                model.clear_resident_memory()  # prefill without explicit memories sees none
            if self.static_prefill and memory is None:
                logits = self._static_prefill(tokens, slots, positions, last)
            else:
                logits = model(tokens, positions, memory=memory, token_group=token_group, cache_slots=slots,
                               logits_at=last)[:, 0]
        finally:
            model.clear_caches()
        self.mem_bias.fill_(NEG_INF)
        self._pending = False  # memories staged for an earlier generation are void
        self.slots.copy_(last[:, None] + 1)
        return logits

    def _static_prefill(self, tokens: Tensor, slots: Tensor, positions: Tensor, last: Tensor) -> Tensor:
        key = tuple(tokens.shape)
        if key not in self._prefills:
            inputs, capture = (tokens, slots, positions, last), self.graph is not None
            try:
                self._prefills[key] = _StaticPrefill(self.model, inputs, self.max_seq_len, capture=capture)
            except RuntimeError as exc:
                if not capture:
                    raise
                # The device refused the capture: this decoder prefills eagerly from now on, and says why.
                self.static_prefill, self.static_prefill_error = False, f"{type(exc).__name__}: {exc}"[:2000]
                warnings.warn(f"capturing a prefill in a CUDA graph failed, prefilling eagerly: {exc}",
                              RuntimeWarning, stacklevel=3)
                return self.model(tokens, positions, cache_slots=slots, logits_at=last)[:, 0]
        return self._prefills[key](tokens, slots, positions, last)

    # ---- memory swaps -----------------------------------------------------------------------
    def stage_memories(self, memories: Sequence[Sequence[ExplicitMemory] | None]) -> None:
        """Start copying each row's next memories to the device; the next `step` installs them.

        Args:
            memories: per row, the memories its next chunk reads ([]: none), or None to keep the
                row's current ones. Host tensors in pinned memory copy asynchronously, overlapped
                with the step in flight.
        """
        if not self.memory:
            raise ValueError("this decoder has no memory slots (memory=False)")
        if len(memories) != self.batch_size:
            raise ValueError(f"need one entry per row: {self.batch_size}, got {len(memories)}")
        per_row, k = self.stage_k.shape[1], self.stage_k.shape[4]
        for b, mems in enumerate(memories):
            if mems is not None and len(mems) > per_row:
                raise ValueError(f"row {b} has {len(mems)} memories; at most {per_row} fit")
        taken = [(b, j, mem) for b, mems in enumerate(memories) if mems is not None for j, mem in enumerate(mems)]
        shape = self.model.config.memory_shape
        for b, j, mem in taken:  # copy_ broadcasts: a memory of another model would fill every slot
            if tuple(mem.keys.shape) != shape or tuple(mem.values.shape) != shape:
                raise ValueError(f"row {b}'s memory {j} has keys {tuple(mem.keys.shape)} and values "
                                 f"{tuple(mem.values.shape)}; this model's memories are {shape}")
        if self._staged is not None:
            self._staged.synchronize()  # the previous copy out of meta_host is done
        # Host work per memory is two copy launches and nothing else: at batch 32 a swap stages 160
        # memories while one decode step runs, and host time past that step leaves the device idle.
        meta = self.meta_host
        meta.zero_()
        meta[:, -1] = torch.tensor([mems is not None for mems in memories])
        if taken:
            prime_slot_valid([mem for _, _, mem in taken])
            held = torch.stack([mem.slot_valid for _, _, mem in taken]).cpu()  # (N, k)
            rows, cols = torch.tensor([[b, j] for b, j, _ in taken]).unbind(1)  # (N,), (N,)
            meta[:, :-1].unflatten(1, (per_row, k))[rows, cols] = held  # (B, J, k) view of (B, M)
        stream = self._copy_stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if stream is not None:
                stream.wait_event(self._installed)  # the last install has read the staging buffer
            for b, j, mem in taken:
                keys, values = self._stage_views[b][j]  # (L_mem, H_kv, k, D) each
                keys.copy_(mem.keys, non_blocking=True)
                values.copy_(mem.values, non_blocking=True)
            self.stage_meta.copy_(meta, non_blocking=True)
            if stream is not None:
                self._staged.record(stream)
        self._pending = True

    def _install(self) -> None:
        """Move staged memories into the memory slots of the rows that take them (in place)."""
        if self._staged is not None:
            torch.cuda.current_stream(self.device).wait_event(self._staged)
        b, m = self.batch_size, self.mem_slots
        take = self.stage_meta[:, m]  # (B,)
        with torch.inference_mode():
            for i, cache in enumerate(c for c in self.caches if c.mem_slots):
                for buf, stage in ((cache.k, self.stage_k), (cache.v, self.stage_v)):
                    new = stage[:, :, i].transpose(1, 2).reshape(b, buf.shape[1], m, -1)  # (B, H_kv, M, D)
                    slots = buf[:, :, :m]
                    slots.copy_(torch.where(take[:, None, None, None], new, slots))
            bias = torch.where(self.stage_meta[:, :m], 0.0, NEG_INF).to(self.mem_bias.dtype)  # (B, M)
            self.mem_bias.copy_(torch.where(take[:, None], bias, self.mem_bias))
        if self._installed is not None:
            self._installed.record(torch.cuda.current_stream(self.device))
        self._pending = False


def capture_graph(run: Callable[[], Tensor | None], device: torch.device, warmups: int, pool=None,
                  stream: torch.cuda.Stream | None = None):
    """Warms `run` up on a side stream (allocator, cuBLAS handles, kernel choice and, compiled,
    kernel tuning), then captures it: -> (the CUDA graph, what the captured call returned).

    All of it runs on `device`, whichever device the calling thread is on (a worker thread's is
    cuda:0), so that the kernels of a model on cuda:N are the ones captured. `pool`: another graph's
    memory pool, to share (graphs never replayed at once may), captured on the same `stream`. Only
    this thread's calls are checked during the capture: another thread's work on the device does
    not fail it.
    """
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmups):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            out = run()
    return graph, out


class _StaticPrefill:
    """A prefill of one prompt shape (B, T) from static input buffers: tokens, slots, positions
    (B, T) and last (B,). Captured in a CUDA graph when asked (after a warm-up on a side stream);
    each call copies its inputs in and replays it, else runs it eagerly."""

    def __init__(self, model: Transformer, inputs: tuple[Tensor, ...], kv_len: int, *, capture: bool) -> None:
        self.model, self.kv_len = model, kv_len
        self.inputs = tuple(t.clone() for t in inputs)
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self.graph, self.logits = capture_graph(self._run, self.inputs[0].device, warmups=2)

    def _run(self) -> Tensor:
        tokens, slots, positions, last = self.inputs
        logits = self.model(tokens, positions, cache_slots=slots, logits_at=last, kv_len=self.kv_len)
        return logits[:, 0]  # (B, V)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for buffer, value in zip(self.inputs, inputs, strict=True):
            buffer.copy_(value)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


def decode_prologue(model: Transformer, tokens: Tensor, slots: Tensor, prefix_len: int, key_slot: Tensor,
                    ctx_mask: Tensor, mem_mask: Tensor | None, mem_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Embeds the rows' tokens (B, 1) and writes the step's masks from their slots (B, 1).

    Returns x (B, 1, dim) and RoPE's cos, sin (B, 1, 1, D). ctx_mask (B, 1, 1, S) hides the slots
    after each row's; mem_mask (B, 1, 1, M + S), if given, is [mem_bias (B, M) | ctx_mask].
    """
    x = model.tok_embeddings(tokens)  # (B, 1, dim)
    positions = rope_positions(slots, prefix_len, model.config.ref_len)  # (B, 1)
    cos, sin = model.rope(positions, x.dtype)  # (B, 1, 1, D)
    visible = key_slot <= slots  # (B, S)
    ctx_mask.copy_(torch.where(visible, 0.0, NEG_INF)[:, None, None])
    if mem_mask is not None:
        m = mem_bias.shape[1]
        mem_mask[..., :m].copy_(mem_bias[:, None, None])
        mem_mask[..., m:].copy_(ctx_mask)
    return x, cos, sin


def decode_epilogue(model: Transformer, x: Tensor, ffn_out: Tensor, logits: Tensor, slots: Tensor) -> None:
    """x + the last block's ffn_out (B, 1, dim) -> the rows' next-token logits, into `logits` (B, V);
    advances the slots."""
    logits.copy_(model.output(model.norm(x + ffn_out))[:, 0])
    slots.add_(1)


def decode_layer(layer: TransformerBlock, k_cache: Tensor, v_cache: Tensor, mem_slots: int, x: Tensor,
                 prev_ffn_out: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, rows: Tensor,
                 slots: Tensor) -> tuple[Tensor, Tensor]:
    """One block for one token per row.

    Takes the residual stream x (B, 1, dim) before the previous block's FFN output is added, and
    that output; returns the same pair for this block. Each residual add is thus done by the next
    block (or the epilogue), where a compiler fuses it with the norm that reads it: one kernel
    fewer per block. Writes the token's K/V into the caches (B, H_kv, M + S, D) at column
    slot + mem_slots first. A free function of the block, not a method, so that one
    `torch.compile` of it serves every layer: layers differ only in their weights, which Dynamo
    takes as inputs.
    """
    x = x + prev_ffn_out
    attn = layer.attention
    b = x.shape[0]
    h, h_kv, d = attn.n_head, attn.n_kv_head, attn.head_dim
    qk, v = attn.wqkv(layer.attention_norm(x)).split([(h + h_kv) * d, h_kv * d], dim=-1)
    qk = apply_rope(qk.view(b, 1, h + h_kv, d).transpose(1, 2), cos, sin)  # (B, H + H_kv, 1, D), one RoPE
    q, k = qk.split([h, h_kv], dim=1)
    cols = slots[:, 0] + mem_slots  # (B,)
    k_cache[rows, :, cols] = k[:, :, 0]  # (B, H_kv, D)
    v_cache[rows, :, cols] = v.view(b, h_kv, d)
    # The G query heads of a KV head become G query rows of it: no K/V repeat for GQA.
    q = q.reshape(b, h_kv, h // h_kv, d)  # (B, H_kv, G, D)
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)  # (B, H_kv, G, D)
    x = x + attn.wo(y.reshape(b, 1, h * d))
    return x, layer.feed_forward(layer.ffn_norm(x))


def _mask_buffer(b: int, n: int, dtype: torch.dtype, device) -> Tensor:
    """A (B, 1, 1, n) additive-mask view whose row stride is padded to 16 elements.

    The memory-efficient SDPA kernel wants every stride but the last aligned to 16; an unaligned
    mask would be padded (copied) by SDPA at every layer. The row is padded even when n is a
    multiple of 16, so that the view is never contiguous: a compiled step guards on contiguity,
    and one graph then serves every n.
    """
    padded = (n // 16 + 1) * 16
    return torch.zeros(b, 1, 1, padded, dtype=dtype, device=device)[..., :n]


def generate_static(
    decoder: StaticDecoder,
    prompts: Sequence[Sequence[int]],
    *,
    prefix: Sequence[int] = (),
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_tokens: Sequence[int] = (),
    memory_provider: MemoryProvider | None = None,
    on_logits: Callable[[int, Tensor], None] | None = None,
) -> GenerationOutput:
    """`generate.generate` on a StaticDecoder: same prompts, memories and tokens.

    One prompt per decoder row. The host syncs only when it must: once per step with stop tokens
    (to stop early), once per chunk for the retrieval query, and at the end.

    Tokens and finish reasons are `generate`'s. Retrievals differ in one case: a chunk's retrieval
    overlaps the step before the chunk, so a row whose stop token is the chunk's first token has
    retrieved for it, where `generate` (which retrieves after that token) has not.

    Args:
        on_logits: called as on_logits(step, (B, V) logits) with the logits each token was
            sampled from (a static buffer: copy what you keep).
    """
    config, device = decoder.model.config, decoder.device
    bsz, p = len(prompts), len(prefix)
    if bsz != decoder.batch_size:
        raise ValueError(f"the decoder has {decoder.batch_size} rows, got {bsz} prompts")
    if not prompts or any(len(x) == 0 for x in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if p != decoder.prefix_len:
        raise ValueError(f"the decoder expects a prefix of {decoder.prefix_len} tokens, got {p}")
    if memory_provider is not None and not (decoder.memory and prefix):
        raise ValueError("generation with memory needs a decoder with memory slots and the reference prefix")
    config.check_token_ids(prompts, "prompt")
    config.check_token_ids([prefix, stop_tokens], "prefix or stop token")
    lengths = [len(x) for x in prompts]
    width = p + max(lengths)
    if width + max_new_tokens > decoder.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {width + max_new_tokens} exceeds the decoder's "
                         f"{decoder.max_seq_len} slots")

    tokens = torch.zeros(bsz, width, dtype=torch.long)
    tokens[:, :p] = torch.as_tensor(list(prefix), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        tokens[b, p : p + len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
    tokens = tokens.to(device)
    slots = torch.arange(width, device=device)[None].expand(bsz, -1)  # (B, T)
    positions = rope_positions(slots, p, config.ref_len)
    last_slot = torch.tensor(lengths, device=device) + p - 1  # (B,)
    retrievals: list[list[list[int]]] = [[] for _ in prompts]

    memory = token_group = None
    groups: list[list[list[ExplicitMemory]]] = []
    if memory_provider is not None:
        queries = [[list(x[s:e]) for s, e in chunk_spans(len(x), config.chunk_len)] for x in prompts]
        flat = retrieve_memories(memory_provider, [q for per_seq in queries for q in per_seq], config)
        i = 0
        for b, per_seq in enumerate(queries):
            groups.append(flat[i : i + len(per_seq)])
            retrievals[b].extend(per_seq)
            i += len(per_seq)
        if any(mems for per_seq in groups for mems in per_seq):
            memory = stack_memories(_uploaded(groups, device, model_dtype(decoder.model)),
                                    slots_per_group=config.mem_slots, device=device)
            token_group = chunk_groups(slots, p, config.chunk_len)
    last = decoder.prefill(tokens, slots, positions, last_slot, memory, token_group)
    if memory_provider is not None:
        decoder.stage_memories([g[-1] for g in groups])  # the first generated chunk keeps the last prompt chunk's

    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    stop = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)
    history = torch.zeros(bsz, max_new_tokens, dtype=torch.long, device=device)  # (B, N)
    finished_host = [False] * bsz
    chunk = config.chunk_len
    query_host = torch.zeros(bsz, chunk, dtype=torch.long, pin_memory=device.type == "cuda")
    produced = 0
    for step in range(max_new_tokens):
        if on_logits is not None:
            on_logits(step, last)
        next_token = sample(last, sampling, generator)  # (B,)
        history[:, step] = next_token
        produced = step + 1
        if len(stop):
            finished_host = [f or t for f, t in zip(finished_host, torch.isin(next_token, stop).tolist(),
                                                    strict=True)]
            if all(finished_host):
                break
        if step == max_new_tokens - 1:
            break
        # The next step reads new memories when it starts a chunk; its query is known now.
        swap_next = memory_provider is not None and (step + 1) % chunk == 0 and step + 1 < max_new_tokens - 1
        if swap_next:
            query_host.copy_(history[:, step + 1 - chunk : step + 1], non_blocking=True)
            ready = torch.cuda.Event() if device.type == "cuda" else None
            if ready is not None:
                ready.record()
        last = decoder.step(next_token)  # launched before the host waits for the query
        if swap_next:
            if ready is not None:
                ready.synchronize()
            query = query_host.tolist()
            rows = [b for b in range(bsz) if not finished_host[b]]
            found = retrieve_memories(memory_provider, [query[b] for b in rows], config) if rows else []
            staged: list[list[ExplicitMemory] | None] = [None] * bsz
            for b, mems in zip(rows, found, strict=True):
                staged[b] = mems
                retrievals[b].append(query[b])
            if rows:
                decoder.stage_memories(staged)

    out = history[:, :produced].tolist()
    stops = set(stop_tokens)
    reasons = ["length"] * bsz
    for b, seq in enumerate(out):
        hit = next((i for i, t in enumerate(seq) if t in stops), None)
        if hit is not None:
            out[b], reasons[b] = seq[: hit + 1], "stop"
    return GenerationOutput(out, reasons, retrievals)


def _uploaded(groups: list[list[list[ExplicitMemory]]], device: torch.device, dtype: torch.dtype):
    """The same groups with each distinct memory's K/V copied to the device once, asynchronously
    when it lies in pinned memory, so that `stack_memories` stacks on the device, not on the host.
    Positions (small) stay on the host and are stacked there."""
    moved: dict[int, ExplicitMemory] = {}

    def move(m: ExplicitMemory) -> ExplicitMemory:
        if id(m) not in moved:
            moved[id(m)] = ExplicitMemory(m.keys.to(device, dtype, non_blocking=True),
                                          m.values.to(device, dtype, non_blocking=True), m.positions)
        return moved[id(m)]

    return [[[move(m) for m in group] for group in seq] for seq in groups]

