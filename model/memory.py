"""Explicit memories: the stored form of one reference, and the runtime form a forward pass reads.

An ExplicitMemory is what the encoder writes and the memory bank stores: per memory layer and
KV head, the `k` kept tokens' post-RoPE keys and their values. Slots past the reference's
length (a reference shorter than `k` tokens) are padding, marked by position -1.

A MemoryKV is what attention reads: memories grouped per chunk ("group"), flattened into one
key axis, with a mask that says which query token may see which memory slot. Prefill of a
multi-chunk prompt and training pass all chunks' memories at once; the mask keeps every chunk on
its own memories, so there is no Python loop over chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ExplicitMemory:
    """One reference's sparse K/V.

    Attributes:
        keys: (memory_layers, kv_heads, k, head_dim), post-RoPE, encoded at position
            `prefix_len + positions`.
        values: (memory_layers, kv_heads, k, head_dim).
        positions: (memory_layers, kv_heads, k) int, token index inside the reference
            (0..ref_len-1), -1 for a padding slot.
    """

    keys: Tensor
    values: Tensor
    positions: Tensor

    def __post_init__(self) -> None:
        if self.keys.dim() != 4:
            raise ValueError(f"keys must be (layers, kv_heads, k, head_dim), got {tuple(self.keys.shape)}")
        if self.values.shape != self.keys.shape:
            raise ValueError(f"values {tuple(self.values.shape)} must match keys {tuple(self.keys.shape)}")
        if self.positions.shape != self.keys.shape[:3]:
            raise ValueError(
                f"positions {tuple(self.positions.shape)} must be keys.shape[:3]={tuple(self.keys.shape[:3])}"
            )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.keys.shape)  # type: ignore[return-value]

    @property
    def valid(self) -> Tensor:
        """(layers, kv_heads, k) bool: which slots hold a real token."""
        return self.positions >= 0

    @functools.cached_property
    def slot_valid(self) -> Tensor:
        """(k,) bool: which slots hold a real token in every layer and head (padding depends only
        on the reference's length). Kept: a served memory is stacked at every prefill that reads it."""
        return self.valid.all(dim=0).all(dim=0)

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> ExplicitMemory:
        """As `Tensor.to`: `.to(device)`, `.to(dtype)` or both; positions keep their integer type."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return ExplicitMemory(
            self.keys.to(device=device, dtype=dtype),
            self.values.to(device=device, dtype=dtype),
            self.positions.to(device=device),
        )


def prime_slot_valid(memories: Sequence[ExplicitMemory]) -> None:
    """Computes `slot_valid` of the memories that lack it, in one pass per shape, and keeps it.

    Per memory it is three operators; a batch-32 prefill with memory stacks 320 memories, and
    fresh ones (a cold fetch) would cost the thread that drives the device ~1,000 operator calls.
    """
    todo: dict[tuple, list[ExplicitMemory]] = {}
    for mem in memories:
        if "slot_valid" not in mem.__dict__:
            todo.setdefault((tuple(mem.positions.shape), mem.positions.device), []).append(mem)
    for same in todo.values():
        held = (torch.stack([m.positions for m in same]) >= 0).flatten(1, 2).all(dim=1)  # (N, L*H, k) -> (N, k)
        for mem, row in zip(same, held.unbind(0), strict=True):
            mem.__dict__["slot_valid"] = row  # where functools.cached_property keeps it


@dataclass(frozen=True)
class MemoryKV:
    """Memory K/V as one forward pass reads it.

    Attributes:
        k: (memory_layers, B, kv_heads, S_mem, head_dim), S_mem = groups * slots per group.
        v: same shape as k.
        valid: (B, S_mem) bool, False for padding slots and missing memories. Padding depends
            only on the reference's length, so it is the same for every layer and head.
        slot_group: (S_mem,) int, the group each memory slot belongs to.
    """

    k: Tensor
    v: Tensor
    valid: Tensor
    slot_group: Tensor

    @property
    def n_slots(self) -> int:
        return self.k.shape[3]

    def visibility(self, token_group: Tensor) -> Tensor:
        """Which memory slots each query token sees.

        Args:
            token_group: (B, T) int, the memory group of each query token; -1 sees no memory.
        Returns:
            (B, 1, T, S_mem) bool, broadcast over heads.
        """
        same = token_group[:, :, None] == self.slot_group[None, None, :]  # (B, T, S_mem)
        return (same & self.valid[:, None, :])[:, None]


def stack_memories(
    groups: Sequence[Sequence[Sequence[ExplicitMemory]]],
    *,
    slots_per_group: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MemoryKV:
    """Build a MemoryKV from per-sequence, per-group lists of memories.

    The serving engine calls this at every prefill with memory, on the thread that decodes, so it
    concatenates each sequence's memories in slot order (one copy of each) instead of indexing a
    stack of them (`gather_memories`, which training needs for its gradients).

    Args:
        groups: groups[b][g] is the list of memories group g of sequence b reads (at most
            slots_per_group // k of them). Sequences may have fewer groups than others and groups
            fewer memories than the maximum; the gaps are zeros, masked.
        slots_per_group: memory slots per group (mems_per_chunk * k).
    """
    every = [m for seq in groups for grp in seq for m in grp]
    if not every:
        raise ValueError("stack_memories needs at least one memory")
    first = every[0]
    prime_slot_valid(every)
    shape = first.shape
    n_layers, n_kv, k, head_dim = shape
    per_group = slots_per_group // k
    n_groups = max(len(seq) for seq in groups)
    gap_kv = gap_valid = None  # zeros for missing memories, made on first need
    keys, values, valid = [], [], []  # per sequence: its slots in order
    for b, seq in enumerate(groups):
        seq_k, seq_v, seq_valid = [], [], []
        for g in range(n_groups):
            grp = seq[g] if g < len(seq) else ()
            if len(grp) > per_group:
                raise ValueError(f"group {g} of sequence {b} has {len(grp)} memories; at most {per_group} fit")
            for mem in grp:
                if mem.shape != shape:
                    raise ValueError(f"memories of different shapes: {sorted({shape, mem.shape})}")
                seq_k.append(mem.keys)
                seq_v.append(mem.values)
                seq_valid.append(mem.slot_valid)
            if len(grp) < per_group:
                if gap_kv is None:
                    gap_kv = first.keys.new_zeros(n_layers, n_kv, per_group * k, head_dim)
                    gap_valid = torch.zeros(per_group * k, dtype=torch.bool, device=first.positions.device)
                missing = (per_group - len(grp)) * k
                seq_k.append(gap_kv[:, :, :missing])
                seq_v.append(gap_kv[:, :, :missing])
                seq_valid.append(gap_valid[:missing])
        keys.append(torch.cat(seq_k, dim=2))  # (L, H, S_mem, D)
        values.append(torch.cat(seq_v, dim=2))
        valid.append(torch.cat(seq_valid))  # (S_mem,)

    return MemoryKV(
        k=_batched(keys, dim=1).to(device=device, dtype=dtype or first.keys.dtype),  # (L, B, H, S_mem, D)
        v=_batched(values, dim=1).to(device=device, dtype=dtype or first.keys.dtype),
        valid=_batched(valid, dim=0).to(device=device),  # (B, S_mem)
        slot_group=torch.arange(n_groups, device=device or first.keys.device).repeat_interleave(per_group * k),
    )


def _batched(per_sequence: list[Tensor], *, dim: int) -> Tensor:
    """Per-sequence tensors stacked along a new batch axis; one sequence stays a view."""
    return per_sequence[0].unsqueeze(dim) if len(per_sequence) == 1 else torch.stack(per_sequence, dim=dim)


def gather_memories(keys: Tensor, values: Tensor, positions: Tensor, index: Tensor) -> MemoryKV:
    """Build a MemoryKV by indexing a batch of encoded memories; differentiable in keys/values.

    Training encodes each step's references once and lets several chunks read the same memory
    (a chunk reads its own reference and those of the previous chunks), so memories are indexed,
    not copied one by one.

    Args:
        keys, values: (N, memory_layers, kv_heads, k, head_dim) encoded memories.
        positions: (N, memory_layers, kv_heads, k), -1 for padding slots.
        index: (B, G, M) memory index per sequence, group and memory slot; -1 for none.
    """
    n_layers, n_kv, k, head_dim = keys.shape[1:]
    bsz, n_groups, per_group = index.shape
    safe = index.clamp(min=0)
    slot_valid = (positions >= 0).all(dim=1).all(dim=1)  # (N, k): padding is the same for every layer/head
    valid = (index >= 0)[..., None] & slot_valid[safe]  # (B, G, M, k)
    s_mem = n_groups * per_group * k

    def arrange(t: Tensor) -> Tensor:
        g = t[safe]  # (B, G, M, L, H, k, D)
        return g.permute(3, 0, 4, 1, 2, 5, 6).reshape(n_layers, bsz, n_kv, s_mem, head_dim)  # (L, B, H, S, D)

    return MemoryKV(
        k=arrange(keys),
        v=arrange(values),
        valid=valid.reshape(bsz, s_mem),
        slot_group=torch.arange(n_groups, device=index.device).repeat_interleave(per_group * k),
    )
