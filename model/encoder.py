"""Writing explicit memories: encode references and keep the top-k tokens per KV head.

Each reference is encoded on its own as `<s>Reference:` + reference tokens through the memory
layers (paper §3.1, Remark 1); layers past the last memory layer are not run. At every memory
layer and KV head we keep the `mem_tokens_per_head` reference tokens that *receive* the most
attention from all reference tokens (paper §3.3):

    w_j = sum_i softmax_j(q_i . k_j / sqrt(d))     i, j over the reference tokens only

computed without a causal mask and without RoPE. The prefix tokens and padding are neither
candidates nor part of the softmax. With GQA one KV head serves several query heads; their
scores are combined by `config.score_reduction`: "sum" adds the per-head received attention
(each head's softmax sums to one, so every query head has an equal say; ranking by the mean is
the same), "max" takes the largest. The kept keys are the ordinary post-RoPE keys of the causal
forward pass, so memories keep the positions they were encoded at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .memory import ExplicitMemory
from .model import Transformer, apply_rope


def encode_references(
    model: Transformer,
    references: Sequence[Sequence[int]],
    prefix: Sequence[int],
) -> list[ExplicitMemory]:
    """Encode references (token ids, without the prefix) into sparse memories, as one batch.

    Returns one ExplicitMemory per reference, on the CPU in float32. Keys have shape
    (memory_layers, kv_heads, k, head_dim). A reference shorter than k tokens keeps all its
    tokens and pads the remaining slots (position -1, zero K/V).
    """
    keys, values, positions = encode_batch(model, references, prefix)
    return [
        ExplicitMemory(keys[i].float().cpu(), values[i].float().cpu(), positions[i].cpu())
        for i in range(len(references))
    ]


def encode_batch(
    model: Transformer, references: Sequence[Sequence[int]], prefix: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Batched encoding; differentiable with respect to the kept K/V (not the selection).

    Returns:
        keys, values: (N, memory_layers, kv_heads, k, head_dim) in the model's dtype.
        positions: (N, memory_layers, kv_heads, k) int64, index inside the reference or -1.
    """
    config = model.config
    if not references:
        raise ValueError("no references to encode")
    lengths = [len(r) for r in references]
    if min(lengths) == 0:
        raise ValueError("cannot encode an empty reference")
    if max(lengths) > config.ref_len:
        raise ValueError(f"reference of {max(lengths)} tokens exceeds ref_len={config.ref_len}; split it first")
    config.check_token_ids([prefix, *references], "reference")
    device = model.output.weight.device
    p, n, width = len(prefix), len(references), max(lengths)
    tokens = torch.zeros(n, p + width, dtype=torch.long, device=device)
    tokens[:, :p] = torch.as_tensor(list(prefix), dtype=torch.long, device=device)
    for i, ref in enumerate(references):
        tokens[i, p : p + len(ref)] = torch.as_tensor(list(ref), dtype=torch.long, device=device)
    ref_valid = torch.arange(width, device=device)[None, :] < torch.as_tensor(lengths, device=device)[:, None]

    positions = torch.arange(p + width, device=device)[None].expand(n, -1)  # (N, L)
    x = model.tok_embeddings(tokens)  # (N, L, dim)
    cos, sin = model.rope(positions, x.dtype)
    memory_layers = set(config.memory_layers)
    last = max(config.memory_layers)
    kept_k, kept_v, kept_pos = [], [], []
    for i, layer in enumerate(model.layers[: last + 1]):
        h = layer.attention_norm(x)
        q, k, v = layer.attention.project(h)  # (N, H, L, D), (N, H_kv, L, D), (N, H_kv, L, D)
        if i in memory_layers:
            with torch.no_grad():  # only selects tokens: no gradient, and no graph to keep for one
                scores = received_attention(q[:, :, p:], k[:, :, p:], ref_valid, config.score_reduction)
                index = top_k_tokens(scores, ref_valid, config.mem_tokens_per_head)  # (N, H_kv, k)
            k_rope = apply_rope(k, cos, sin)
            gather = (index.clamp(min=0) + p)[..., None].expand(-1, -1, -1, k.shape[-1])  # (N, H_kv, k, D)
            pad = (index < 0)[..., None]
            kept_k.append(torch.gather(k_rope, 2, gather).masked_fill(pad, 0.0))
            kept_v.append(torch.gather(v, 2, gather).masked_fill(pad, 0.0))
            kept_pos.append(index)
        if i < last:
            x = layer(x, cos, sin, None, None, None, x.shape[1])
    return (
        torch.stack(kept_k, dim=1),  # (N, L_mem, H_kv, k, D)
        torch.stack(kept_v, dim=1),
        torch.stack(kept_pos, dim=1),  # (N, L_mem, H_kv, k)
    )


def received_attention(q: Tensor, k: Tensor, valid: Tensor, reduction: str = "sum") -> Tensor:
    """Attention each reference token receives from all reference tokens.

    Args:
        q: (N, H, L, D) queries without RoPE; k: (N, H_kv, L, D) keys without RoPE.
        valid: (N, L) bool, real tokens (False: padding).
        reduction: how the query heads of a GQA group are combined ("sum" or "max").
    Returns:
        (N, H_kv, L) scores; padding tokens score -inf.
    """
    n, n_head, length, head_dim = q.shape
    n_kv = k.shape[1]
    q = q.float().view(n, n_kv, n_head // n_kv, length, head_dim)  # (N, H_kv, G, L, D)
    logits = q @ k.float()[:, :, None].transpose(-1, -2) / math.sqrt(head_dim)  # (N, H_kv, G, L, L)
    key_ok = valid[:, None, None, None, :]
    logits = logits.masked_fill(~key_ok, float("-inf"))
    attn = logits.softmax(dim=-1)  # no causal mask: every token sees every token
    attn = attn.masked_fill(~valid[:, None, None, :, None], 0.0)  # padding queries give nothing
    received = attn.sum(dim=3)  # (N, H_kv, G, L)
    combined = received.sum(dim=2) if reduction == "sum" else received.amax(dim=2)
    return combined.masked_fill(~valid[:, None, :], float("-inf"))


def top_k_tokens(scores: Tensor, valid: Tensor, k: int) -> Tensor:
    """Indices of the k highest-scoring tokens, ascending; -1 fills slots a short reference lacks.

    Args:
        scores: (N, H_kv, L); valid: (N, L).
    Returns:
        (N, H_kv, k) int64.
    """
    n, n_kv, length = scores.shape
    take = min(k, length)
    index = scores.topk(take, dim=-1).indices  # (N, H_kv, take)
    n_valid = valid.sum(dim=-1)[:, None, None]  # (N, 1, 1)
    rank = torch.arange(take, device=scores.device)
    # topk returns the best first, so a reference with n_valid < k has its real tokens first.
    index = torch.where(rank < n_valid, index, torch.full_like(index, length))
    index = index.sort(dim=-1).values
    index = torch.where(index == length, torch.full_like(index, -1), index)
    if take < k:
        index = torch.cat([index, index.new_full((n, n_kv, k - take), -1)], dim=-1)
    return index
