"""Static KV cache of one attention layer, allocated by `Transformer.setup_caches`.

Layout per row: [memory slots (memory layers only) | context slots]. The memory slots hold the
memories the current chunk reads while decoding; they are swapped every chunk without touching
the context, so decode shapes never change when memories change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    def __init__(
        self,
        max_batch_size: int,
        n_kv_head: int,
        max_seq_len: int,
        head_dim: int,
        *,
        mem_slots: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_head, mem_slots + max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "mem_valid", torch.zeros(max_batch_size, mem_slots, dtype=torch.bool, device=device), persistent=False
        )
        self.mem_slots = mem_slots
        self.max_seq_len = max_seq_len

    def update(
        self, slots: Tensor, k: Tensor, v: Tensor, kv_len: int, *, with_memory: bool = True,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Write new context K/V and return what attention reads.

        Args:
            slots: (B, T) context slot of each new token.
            k, v: (B, H_kv, T, D), keys post-RoPE.
            kv_len: context slots to return (max slot + 1).
            with_memory: include the memory slots in front.
            rows: (B,) cache rows of the sequences; None means rows 0..B-1, whose K/V are
                returned as views (the decode path), while other rows are gathered (a copy).
        Returns:
            k, v: (B, H_kv, [mem_slots +] kv_len, D).
        """
        if kv_len > self.max_seq_len:
            raise ValueError(f"context of {kv_len} tokens exceeds the cache's {self.max_seq_len}")
        bsz = k.shape[0]
        index = torch.arange(bsz, device=k.device) if rows is None else rows
        cols = slots + self.mem_slots  # (B, T)
        # Advanced indexing puts the (B, T) index dims first: the target is (B, T, H_kv, D).
        self.k[index[:, None], :, cols] = k.transpose(1, 2)
        self.v[index[:, None], :, cols] = v.transpose(1, 2)
        start = 0 if with_memory else self.mem_slots
        end = self.mem_slots + kv_len
        if rows is None:
            return self.k[:bsz, :, start:end], self.v[:bsz, :, start:end]
        return self.k[rows, :, start:end], self.v[rows, :, start:end]

    def set_memory(self, k: Tensor, v: Tensor, valid: Tensor, rows: Tensor | None = None) -> None:
        """k, v: (B', H_kv, mem_slots, D); valid: (B', mem_slots); rows: (B',) or None for 0..B'-1."""
        if rows is None:
            rows = torch.arange(k.shape[0], device=self.k.device)
        self.k[rows, :, : self.mem_slots] = k.to(self.k.dtype)
        self.v[rows, :, : self.mem_slots] = v.to(self.v.dtype)
        self.mem_valid[rows] = valid

    def set_row_memory(self, row: int, k: Tensor, v: Tensor, valid: Tensor) -> None:
        """One row's first n memory slots: k, v (H_kv, n, D), valid (n,); the rest are cleared."""
        n = k.shape[1]
        self.k[row, :, :n].copy_(k)
        self.v[row, :, :n].copy_(v)
        self.mem_valid[row, :n].copy_(valid)
        self.mem_valid[row, n:] = False

    def clear_memory(self, rows: Tensor | int | None = None) -> None:
        if rows is None:
            self.mem_valid.zero_()
        else:
            self.mem_valid[rows] = False
