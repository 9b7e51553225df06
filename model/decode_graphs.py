"""The serving engine's decode pass in a few fixed shapes, each replayed from a CUDA graph.

The engine decodes rows 0..hi-1 of its cache (hi: one past the highest row in use) with
`Transformer.forward`, whose shapes follow hi and the longest context. On a GPU a pass of a large
model at a small batch is mostly the CPU launching kernels one by one (~25 per block), not the GPU
reading weights. Here a pass is padded to a batch bucket (1, 2, 4, ... up to the cache's rows) and
attends over a context bucket (256, 384, 512, 768, ... slots: each at most 1.5x the one before, so
that a pass reads at most half again the context it needs; the mask hides the slots after each
row's), so a few dozen shapes cover every pass. Each is captured once in a CUDA graph, when the
engine starts, and replayed from static input buffers.

What a graph reads besides its inputs lives at fixed addresses, updated in place between passes:
the caches' keys and values, their memory slots (a memory swap copies into them) and the model's
additive mask of the resident memory slots. The pass reads nothing back on the host (its context
bucket comes from the slots the engine wrote on the host), which a capture requires.

Without graphs (the CPU), a pass runs as before: the rows in use and the context they need. With
`static=True` and no graphs, the bucketed passes run eagerly, so the padding and the masks are
checked on a CPU.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import Tensor

from .model import Transformer
from .static_decode import capture_graph

log = logging.getLogger(__name__)

CONTEXT_STEP = 256  # the smallest context bucket, in slots


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, and max_batch."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch]


def context_buckets(max_seq_len: int, step: int = CONTEXT_STEP) -> list[int]:
    """step, 1.5 step, 2 step, 3 step, 4 step, 6 step, ... below max_seq_len, and max_seq_len."""
    sizes, n = [], step
    while n < max_seq_len:
        sizes.append(n)
        n = n * 3 // 2 if n & (n - 1) == 0 else n * 4 // 3  # a power of two grows by half, 1.5x one to the next
    return [*sizes, max_seq_len]


class DecodePasses:
    """Decode passes of `model` over its caches (set up for `max_batch` rows of `max_seq_len` slots).

    Args:
        static: pad passes to batch and context buckets (`rows_for`, `context_for`).
        cuda_graph: capture each bucket's pass in a CUDA graph (`capture`); needs `static` and CUDA.
    """

    def __init__(self, model: Transformer, max_batch: int, max_seq_len: int, *, static: bool,
                 cuda_graph: bool) -> None:
        self.model, self.max_batch, self.max_seq_len = model, max_batch, max_seq_len
        self.device = model.output.weight.device
        if cuda_graph and not (static and self.device.type == "cuda"):
            raise ValueError("CUDA graphs of the decode pass need static shapes and a model on a CUDA device")
        self.static, self.cuda_graph = static, cuda_graph
        self.batches = batch_buckets(max_batch) if static else []
        self.contexts = context_buckets(max_seq_len) if static else []
        # Static inputs of the graphs: tokens, RoPE positions and cache slots (3, max_batch, 1).
        self.inputs = torch.zeros(3, max_batch, 1, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # (rows, context) ->
        self._bound: list[Tensor] = []  # what the graphs read besides their inputs, as captured
        self.error: str | None = None  # why the capture failed (passes then run eagerly, unpadded)

    def rows_for(self, rows: int) -> int:
        """The rows a pass over cache rows 0..rows-1 computes."""
        return next(b for b in self.batches if b >= rows) if self.static else rows

    def context_for(self, slots: int) -> int:
        """The context slots a pass attends over, where its rows need `slots`."""
        if slots > self.max_seq_len:
            raise ValueError(f"a context of {slots} slots exceeds the cache's {self.max_seq_len}")
        return next(c for c in self.contexts if c >= slots) if self.static else slots

    def capture(self) -> None:
        """Capture every bucket's pass; on a device that refuses, decode eagerly and unpadded, and say why.

        The warm-up passes write placeholder K/V into the last slot of every row, as a prefill's
        padding does: a slot that every stream writes before it reads it.
        """
        if not self.cuda_graph or self.graphs:
            return
        start = time.monotonic()
        pool, stream = None, torch.cuda.Stream(self.device)  # one pool, captured on one stream
        try:
            self.inputs.zero_()
            self.inputs[2].fill_(self.max_seq_len - 1)  # slots
            for rows in reversed(self.batches):  # the largest first: the others' memory fits in its pool
                for context in reversed(self.contexts):
                    graph, logits = capture_graph(lambda r=rows, c=context: self._run(r, c), self.device,
                                                  warmups=2, pool=pool, stream=stream)
                    pool = graph.pool() if pool is None else pool
                    self.graphs[rows, context] = graph, logits
        except RuntimeError as exc:
            self.release()
            self.static, self.batches, self.contexts = False, [], []
            self.error = f"{type(exc).__name__}: {exc}"[:2000]
            log.warning("capturing the decode pass in CUDA graphs failed; decoding eagerly: %s", self.error)
            warnings.warn(f"capturing the decode pass in CUDA graphs failed; decoding eagerly: {exc}",
                          RuntimeWarning, stacklevel=2)
            return
        self._bound = self._reads()
        log.info("captured %d CUDA graphs of the decode pass (rows %s; context %s) in %.1f s", len(self.graphs),
                 self.batches, self.contexts, time.monotonic() - start)

    def release(self) -> None:
        """Drop the graphs and their memory pool (before the model's caches are freed)."""
        self.graphs.clear()
        self._bound = []

    def _reads(self) -> list[Tensor]:
        """The tensors a captured pass reads besides its inputs: replaced ones would leave it reading freed memory."""
        caches = [layer.attention.kv_cache for layer in self.model.layers]
        return [self.model._resident_mask, self.model.rope.inv_freq,
                *(t for cache in caches for t in (cache.k, cache.v, cache.mem_valid))]

    def __call__(self, tokens: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        """One decode pass: (B, 1) host tensors, B from `rows_for` -> (B, V) logits.

        Replayed, the logits are a graph's output buffer, valid until the next pass (of any shape).
        """
        rows = tokens.shape[0]
        context = self.context_for(int(slots.max()) + 1)
        inputs = torch.stack([tokens, positions, slots])  # (3, B, 1)
        if self.device.type == "cuda":  # a fresh pinned buffer, kept by the host allocator until copied
            self.inputs[:, :rows].copy_(inputs.pin_memory(), non_blocking=True)
        else:
            self.inputs[:, :rows].copy_(inputs)
        graph = self.graphs.get((rows, context))
        if graph is None:
            return self._run(rows, context)
        if any(now is not then for now, then in zip(self._reads(), self._bound, strict=True)):
            raise RuntimeError("the model's caches or masks were replaced since the decode passes were captured")
        graph[0].replay()
        return graph[1]

    def _run(self, rows: int, context: int) -> Tensor:
        tokens, positions, slots = self.inputs[:, :rows]  # (B, 1) each
        return self.model(tokens, positions, cache_slots=slots, kv_len=context)[:, -1]  # (B, V)
