"""Where context tokens sit: cache slots, RoPE positions and memory groups.

A context is `prefix + body`, where prefix is the tokenized `<s>Reference:` and body starts with
the ordinary `<s>` (the separator between memories and text, paper §3.2). Slots number the
context tokens 0, 1, 2, ...; RoPE positions skip the `ref_len` positions that memories occupy
right after the prefix. Body token i belongs to chunk i // chunk_len, and chunk c reads memory
group c. Prefix tokens read no memory: they are the attention sink, identical to the prefix a
reference was encoded with, and their keys never depend on which memories a chunk retrieved.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_positions(slots: Tensor, prefix_len: int, ref_len: int) -> Tensor:
    """Context slots -> RoPE positions. With prefix_len == 0 the two are equal (plain Llama)."""
    if prefix_len == 0:
        return slots
    return torch.where(slots < prefix_len, slots, slots + ref_len)


def chunk_groups(slots: Tensor, prefix_len: int, chunk_len: int) -> Tensor:
    """Context slots -> memory group (chunk index of the body token), -1 for prefix tokens."""
    body = slots - prefix_len
    return torch.where(body >= 0, torch.div(body, chunk_len, rounding_mode="floor"), torch.full_like(body, -1))


def chunk_spans(body_len: int, chunk_len: int) -> list[tuple[int, int]]:
    """Body index ranges [start, end) of the chunks of a body of body_len tokens."""
    return [(s, min(s + chunk_len, body_len)) for s in range(0, body_len, chunk_len)]
