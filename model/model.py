"""The Memory3 transformer: a Llama-style decoder whose first layers also read explicit memories.

With no memories this is numerically a Llama (pre-norm, RMSNorm, RoPE, GQA, gated MLP, no bias).
At a memory layer, memory keys/values are concatenated in front of the context keys/values and
share one softmax with them (paper Eq. 4); each chunk reads its own memories only. A pass over
whole chunks (a prefill of prompt bodies) attends chunk by chunk, a batch row per chunk
(`chunk_attention`); any other pass puts all chunks' memories on the key axis and masks.

Positions (paper §3.2, "parallel position encoding"):

    [<s>Reference:] [memories: positions p .. p+ref_len-1, all in parallel] [<s> context ...]
     0 .. p-1                                                                p+ref_len ..

The reference prefix is ordinary context at every layer. Memory keys were rotated at the
positions they had when their reference was encoded (after the same prefix), and are stored
post-RoPE, so attention never re-rotates them. Cache slots count context tokens only; the
caller maps slots to RoPE positions (see `model.layout`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Memory3Config
from .kv_cache import KVCache
from .memory import ExplicitMemory, MemoryKV, prime_slot_valid


class Transformer(nn.Module):
    def __init__(self, config: Memory3Config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        memory_layers = set(config.memory_layers)
        self.layers = nn.ModuleList(
            TransformerBlock(config, is_memory_layer=i in memory_layers) for i in range(config.n_layer)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)
        self._cache_batch = 0
        self._resident_mask: Tensor | None = None  # (B_cache, mem_slots) additive, while caches hold memory slots
        self._prefix_cache: tuple | None = None  # (key, per-layer prefix K/V), see _prefix_kv

    # ---- caches -----------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_len: int, *, memory: bool = True) -> None:
        """Allocate KV caches on the model's device and dtype.

        Memory layers get `mem_slots` extra slots in front of the context, holding the memories
        the current chunk of each sequence reads while decoding. `memory=False` allocates none,
        which is the engine "without memory".
        """
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {self.config.max_seq_len}")
        param = self.output.weight
        for layer in self.layers:
            mem_slots = self.config.mem_slots if (memory and layer.is_memory_layer) else 0
            layer.attention.kv_cache = KVCache(
                max_batch_size, self.config.n_kv_head, max_seq_len, self.config.head_dim,
                mem_slots=mem_slots, dtype=param.dtype, device=param.device,
            )
        self._cache_batch = max_batch_size
        self._resident_mask = None
        if memory and self.config.mem_slots and self._memory_layers():
            self._update_resident_mask()

    def attach_caches(self, caches: list[KVCache]) -> None:
        """Re-install caches an earlier `setup_caches` allocated (one per layer).

        A static decoder captures its caches' addresses in a CUDA graph, so it keeps them across
        generations and lends them to this model for prefill only.
        """
        if len(caches) != len(self.layers):
            raise ValueError(f"need one cache per layer: {len(self.layers)}, got {len(caches)}")
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.attention.kv_cache = cache
        self._cache_batch = caches[0].k.shape[0]
        self._resident_mask = None
        if any(cache.mem_slots for cache in caches):
            self._update_resident_mask()

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self._cache_batch = 0
        self._resident_mask = None

    @property
    def has_cache(self) -> bool:
        return self._cache_batch > 0

    def write_prefix(self, prefix: Tensor, rows: Tensor | None = None) -> None:
        """Fill context slots 0..p-1 of cache rows with the reference prefix's K/V.

        The prefix comes first in every context and reads no memory, so its keys and values
        depend on the weights only: they are computed by one pass at batch 1, kept until the
        weights change, and copied to the rows. This replaces B passes per prefill (and keeps a
        128-token prompt at 128 query rows).

        Args:
            prefix: (p,) token ids of `<s>Reference:`.
            rows: (R,) cache rows to fill; None means all rows. Their contexts start anew, so
                their resident memories are cleared first (prefix tokens read no memory).
        """
        if not self.has_cache:
            raise ValueError("write_prefix needs caches (setup_caches)")
        if rows is None:
            rows = torch.arange(self._cache_batch, device=prefix.device)
        if self._resident_mask is not None:
            self.clear_resident_memory(rows)
        for layer, (k, v) in zip(self.layers, self._prefix_kv(prefix, rows[:1]), strict=True):
            cache = layer.attention.kv_cache
            cols = slice(cache.mem_slots, cache.mem_slots + prefix.shape[0])
            cache.k[rows, :, cols] = k
            cache.v[rows, :, cols] = v

    def _prefix_kv(self, prefix: Tensor, row: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the prefix's (H_kv, p, D) keys and values; computed in cache `row` on a miss.

        The key names every parameter's storage and version counter, so an optimizer step,
        `load_state_dict` or `.to()` computes them anew.
        """
        key = (tuple(prefix.tolist()), prefix.device,
               tuple((p.data_ptr(), p._version) for p in self.parameters()))
        if self._prefix_cache is not None and self._prefix_cache[0] == key:
            return self._prefix_cache[1]
        slots = torch.arange(prefix.shape[0], device=prefix.device)[None]  # (1, p); positions = slots here
        self(prefix[None], slots, cache_slots=slots, cache_rows=row)
        kv = []
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cols = slice(cache.mem_slots, cache.mem_slots + prefix.shape[0])
            kv.append((cache.k[row[0], :, cols].clone(), cache.v[row[0], :, cols].clone()))
        self._prefix_cache = (key, kv)
        return kv

    def set_resident_memory(self, memory: MemoryKV, rows: Tensor | None = None) -> None:
        """Place one group of memories per sequence into the caches' memory slots.

        Args:
            memory: a MemoryKV with exactly one group (S_mem == mem_slots).
            rows: (B',) cache rows to update; all rows when None.
        """
        if memory.n_slots != self.config.mem_slots:
            raise ValueError(f"resident memory needs {self.config.mem_slots} slots, got {memory.n_slots}")
        for i, layer in enumerate(self._memory_layers()):
            layer.attention.kv_cache.set_memory(memory.k[i], memory.v[i], memory.valid, rows)
        self._update_resident_mask()

    def clear_resident_memory(self, rows: Tensor | None = None) -> None:
        for layer in self._memory_layers():
            layer.attention.kv_cache.clear_memory(rows)
        self._update_resident_mask()

    def install_memories(self, row: int, memories: Sequence[ExplicitMemory]) -> None:
        """Make `memories` (at most mems_per_chunk, none clears) the resident memories of cache `row`.

        The serving engine swaps one stream's memories at each of its chunk boundaries, on the
        thread that decodes: this writes them in place with plain slices (no MemoryKV, no index
        tensors), one concatenation per keys and values. Slots past the memories are masked.
        Memories in host memory on a CUDA model are joined in pinned memory and copied without
        waiting: the thread goes on while the copy runs, queued before the next pass that reads them.
        """
        if not memories:
            self._write_resident(row, None)
            return
        shape = memories[0].shape
        if any(m.shape != shape for m in memories):
            raise ValueError(f"memories of different shapes: {sorted({m.shape for m in memories})}")
        c = self.config
        if tuple(shape) != c.memory_shape:
            raise ValueError(f"memories of shape {tuple(shape)} do not fit this model: need {c.memory_shape}")
        if len(memories) > c.mems_per_chunk:
            raise ValueError(f"{len(memories)} memories do not fit the {c.mems_per_chunk} a chunk reads")
        prime_slot_valid(memories)
        device = self.output.weight.device
        self._write_resident(row, (_joined([m.keys for m in memories], 2, device),  # (L_mem, H_kv, n*k, D)
                                   _joined([m.values for m in memories], 2, device),
                                   _joined([m.slot_valid for m in memories], 0, device)))  # (n*k,)

    def keep_resident(self, row: int, memory: MemoryKV, sequence: int, group: int) -> None:
        """After a prefill with explicit memories, keep group `group` of `sequence` resident in cache `row`.

        The first generated chunk reads the last prompt chunk's memories: they are cut from the
        prefill's MemoryKV (a group's slots are contiguous) rather than concatenated again.
        """
        per_group = memory.n_slots // (int(memory.slot_group[-1]) + 1)
        if per_group > self.config.mem_slots:
            raise ValueError(f"a group of {per_group} slots does not fit the {self.config.mem_slots} resident slots")
        cols = slice(group * per_group, (group + 1) * per_group)
        self._write_resident(row, (memory.k[:, sequence, :, cols], memory.v[:, sequence, :, cols],
                                   memory.valid[sequence, cols]))

    def clear_rows(self, rows: Sequence[int]) -> None:
        """Zero every key and value of cache `rows`, memory slots included, and their resident memories.

        The slots past a context are masked, never cleared: a masked slot gets weight 0, and
        0 × NaN is NaN. A row where a pass produced NaN or inf would hand them to the next
        sequence it serves, whatever its mask. Written in place: a captured decode pass reads the
        caches where they are.
        """
        if not self.has_cache:
            raise ValueError("clearing rows needs caches (setup_caches)")
        index = torch.tensor(list(rows), dtype=torch.long, device=self.output.weight.device)
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cache.k.index_fill_(0, index, 0)
            cache.v.index_fill_(0, index, 0)
        for row in rows:
            self._write_resident(row, None)

    def _write_resident(self, row: int, kv: tuple[Tensor, Tensor, Tensor] | None) -> None:
        """kv: keys, values (L_mem, H_kv, n, D) and valid (n,) for the row's first n slots; None clears it."""
        if not self.has_cache:
            raise ValueError("resident memories need caches (setup_caches)")
        for i, layer in enumerate(self._memory_layers()):
            if kv is None:
                layer.attention.kv_cache.clear_memory(row)
            else:
                layer.attention.kv_cache.set_row_memory(row, kv[0][i], kv[1][i], kv[2])
        self._update_resident_mask(row)

    def _update_resident_mask(self, row: int | None = None) -> None:
        """Cache the additive mask of the resident memory slots; it changes once per chunk only.

        Rewritten in place (with `row`, only that row changed), so that it stays at the address a
        CUDA graph of the decode pass reads (`decode_graphs.py`).
        """
        valid = self._memory_layers()[0].attention.kv_cache.mem_valid  # (B_cache, M)
        mask = self._resident_mask
        if mask is None or mask.shape != valid.shape:
            self._resident_mask = additive_mask(valid, self.output.weight.dtype)
        elif row is None:
            mask.copy_(additive_mask(valid, mask.dtype))  # in place: a captured decode pass reads it
        else:
            mask[row] = additive_mask(valid[row], mask.dtype)

    def _memory_layers(self) -> list[TransformerBlock]:
        return [layer for layer in self.layers if layer.is_memory_layer]

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        *,
        memory: MemoryKV | None = None,
        token_group: Tensor | None = None,
        cache_slots: Tensor | None = None,
        cache_rows: Tensor | None = None,
        logits_at: Tensor | None = None,
        kv_len: int | None = None,
    ) -> Tensor:
        """Logits for every input token, or for one per sequence.

        Args:
            tokens: (B, T) token ids.
            positions: (B, T) RoPE positions.
            memory: memories for this pass, all groups at once (prefill, training).
            token_group: (B, T) memory group of each token (-1: none); required with `memory`.
            cache_slots: (B, T) cache slot of each token; required once caches are set up.
                Without caches the tokens attend causally to each other only.
            cache_rows: (B,) cache row of each sequence; None means rows 0..B-1. A serving
                engine prefills a joining stream into whichever row is free.
            logits_at: (B,) index of the one token of each sequence whose logits are wanted: a
                prefill needs its last prompt token's only, and the output projection of a
                long prompt costs as much as a few blocks.
            kv_len: with caches, the context slots the tokens attend over (the mask hides those
                after each token's own); at least the largest of `cache_slots` + 1, which is the
                default, read from the device. A caller that passes it does not wait for the device
                here, so that the pass can be captured in a CUDA graph.
        Returns:
            (B, T, vocab_size) logits; (B, 1, vocab_size) with `logits_at`.
        """
        if memory is not None and token_group is None:
            raise ValueError("token_group is required when memory is given")
        if self.has_cache != (cache_slots is not None):
            raise ValueError("pass cache_slots exactly when caches are set up (setup_caches)")
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        cos, sin = self.rope(positions, x.dtype)  # (B, 1, T, head_dim)
        if cache_rows is not None and (cache_slots is None or cache_rows.shape != tokens.shape[:1]):
            raise ValueError("cache_rows needs cache_slots and one row per sequence")
        if kv_len is not None and cache_slots is None:
            raise ValueError("kv_len is the context of a pass with caches; pass it with cache_slots")
        masks = self._masks(tokens.shape[1], memory, token_group, cache_slots, cache_rows, kv_len)
        kv_len = masks.kv_len
        memory_index = 0
        for layer in self.layers:
            layer_memory = None
            if layer.is_memory_layer and memory is not None:
                layer_memory = (memory.k[memory_index], memory.v[memory_index])
                memory_index += 1
            mask = masks.memory if layer.is_memory_layer else masks.context
            x = layer(x, cos, sin, mask, layer_memory, cache_slots, kv_len, cache_rows, masks.chunks)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]  # (B, 1, dim)
        return self.output(self.norm(x))

    def _masks(
        self, seq_len: int, memory: MemoryKV | None, token_group: Tensor | None, cache_slots: Tensor | None,
        cache_rows: Tensor | None = None, kv_len: int | None = None,
    ) -> _Masks:
        """Attention masks shared by all layers of one kind; None means plain causal attention.

        Key order at a memory layer is [memories | context]: explicit memories when given,
        else the cache's resident memory slots, else none. With caches (inference) the masks
        are additive (0 / -inf) in the model's dtype, built once per pass: SDPA would otherwise
        convert a boolean mask at every layer. Training keeps boolean masks, whose meaning
        does not depend on the autocast dtype.
        """
        if cache_slots is None:
            context = None
            kv_len = seq_len
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=self.output.weight.device).tril()
            causal = causal[None, None]  # (1, 1, T, T)
        else:
            if kv_len is None:
                kv_len = int(cache_slots.max()) + 1
            key_slot = torch.arange(kv_len, device=cache_slots.device)
            causal = (key_slot[None, None, :] <= cache_slots[:, :, None])[:, None]  # (B, 1, T, S)
            context = causal
        chunks = self._chunk_layout(memory, token_group) if memory is not None and cache_slots is not None else 0
        if chunks:
            # Chunk-major rows (see `chunk_attention`): row b*G + g holds chunk g of sequence b, and
            # its keys are [group g's memory slots | context]. Query rows past the prompt (padding
            # of the last chunk) see the whole context, so no softmax row is empty.
            bsz, seq_len = cache_slots.shape
            per_group = memory.n_slots // chunks
            rows_len = chunks * self.config.chunk_len
            q_slots = F.pad(cache_slots, (0, rows_len - seq_len), value=kv_len - 1)  # (B, G*Lc)
            see_context = key_slot[None, None, :] <= q_slots[:, :, None]  # (B, G*Lc, S)
            see_context = see_context.view(bsz * chunks, 1, self.config.chunk_len, kv_len)
            see_memory = memory.valid.reshape(bsz * chunks, 1, 1, per_group)  # (B*G, 1, 1, M)
            see = torch.cat([see_memory.expand(-1, -1, self.config.chunk_len, -1), see_context], dim=-1)
            dtype = self.output.weight.dtype
            plain_layers = len(self._memory_layers()) < len(self.layers)
            return _Masks(context=additive_mask(context, dtype) if plain_layers else None,
                          memory=additive_mask(see, dtype), kv_len=kv_len, chunks=chunks)
        if memory is not None:
            visible = memory.visibility(token_group)  # (B, 1, T, S_mem)
            mem_mask = torch.cat([visible, causal.expand(visible.shape[0], -1, -1, -1)], dim=-1)
        elif cache_slots is not None and self._resident_mask is not None:
            bias = self._resident_mask
            bias = bias[: cache_slots.shape[0]] if cache_rows is None else bias[cache_rows]
            resident = bias[:, None, None, :]  # (B, 1, 1, M), additive
            context = additive_mask(causal, self._resident_mask.dtype)
            mem_mask = torch.cat([resident.expand(-1, 1, seq_len, -1), context], dim=-1)
            return _Masks(context=context, memory=mem_mask, kv_len=kv_len)
        else:
            mem_mask = context
        if cache_slots is not None:
            dtype = self.output.weight.dtype
            context = additive_mask(context, dtype)
            mem_mask = context if mem_mask is causal else additive_mask(mem_mask, dtype)
        return _Masks(context=context, memory=mem_mask, kv_len=kv_len)

    def _chunk_layout(self, memory: MemoryKV, token_group: Tensor) -> int:
        """The number of chunks G when a pass can attend chunk by chunk, else 0.

        That holds when token t reads group t // chunk_len and the groups are exactly the chunks
        the tokens span (a prefill of prompt bodies): then each chunk needs its own group's
        memory slots only, and attention over [all groups' slots | context] with a mask would
        mostly compute scores the mask throws away.
        """
        seq_len, chunk_len, n_slots = token_group.shape[1], self.config.chunk_len, memory.n_slots
        chunks = -(-seq_len // chunk_len)
        if n_slots % chunks:
            return 0
        index = torch.arange(max(seq_len, n_slots), device=token_group.device)
        token_ok = torch.equal(token_group, (index[:seq_len] // chunk_len).expand_as(token_group))
        return chunks if token_ok and torch.equal(memory.slot_group, index[:n_slots] // (n_slots // chunks)) else 0


class _Masks:
    __slots__ = ("context", "memory", "kv_len", "chunks")

    def __init__(self, context: Tensor | None, memory: Tensor | None, kv_len: int, chunks: int = 0) -> None:
        self.context, self.memory, self.kv_len, self.chunks = context, memory, kv_len, chunks


class TransformerBlock(nn.Module):
    def __init__(self, config: Memory3Config, *, is_memory_layer: bool) -> None:
        super().__init__()
        self.is_memory_layer = is_memory_layer
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        memory: tuple[Tensor, Tensor] | None,
        cache_slots: Tensor | None,
        kv_len: int,
        cache_rows: Tensor | None = None,
        chunks: int = 0,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, memory, cache_slots, kv_len, cache_rows,
                               chunks)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, config: Memory3Config) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        # Post-RoPE queries pass through here, so a forward hook can read them (training supervises
        # memory attention with them) without a second projection; without hooks it costs nothing.
        self.query_probe = nn.Identity()
        self.kv_cache: KVCache | None = None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values before RoPE: (B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D)."""
        bsz, seq_len, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seq_len, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(bsz, seq_len, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(bsz, seq_len, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        memory: tuple[Tensor, Tensor] | None,
        cache_slots: Tensor | None,
        kv_len: int,
        cache_rows: Tensor | None = None,
        chunks: int = 0,
    ) -> Tensor:
        """`chunks` > 0: `memory` holds one group per chunk of the tokens, and `mask` is chunk-major."""
        bsz, seq_len, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = self.query_probe(q)  # (B, H, T, D)
        if cache_slots is not None:
            # Explicit memories replace the resident ones, so skip the resident slots then.
            k, v = self.kv_cache.update(cache_slots, k, v, kv_len, with_memory=memory is None, rows=cache_rows)
        if memory is not None and chunks:
            y = chunk_attention(q, k, v, memory, mask, chunks)
        else:
            if memory is not None:
                k = torch.cat([memory[0], k], dim=2)  # (B, H_kv, S_mem + S, D)
                v = torch.cat([memory[1], v], dim=2)
            y = attend(q, k, v, mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(bsz, seq_len, self.n_head * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """Gated MLP (SwiGLU), no bias."""

    def __init__(self, config: Memory3Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the weight, as Llama does, so bf16 matches; one
        # fused op normalises (bit for bit x * rsqrt(mean(x^2) + eps)), against five in Llama's code.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the Llama (rotate-half) convention; cos/sin are computed per call from positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, T) positions -> cos, sin of shape (B, 1, T, head_dim)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, memory: tuple[Tensor, Tensor], mask: Tensor,
                    chunks: int) -> Tensor:
    """Attention where each chunk of queries reads its own memory group and the whole context.

    Chunks become batch rows, so every chunk's keys are [its group's slots | context]: the scores
    of one pass are B*G*Lc*(M + S) instead of B*T*(G*M + S), with no Python loop over chunks.

    Args:
        q: (B, H, T, D) with (G - 1) * Lc < T <= G * Lc.
        k, v: (B, H_kv, S, D) context keys and values.
        memory: (B, H_kv, G*M, D) keys and values, group g's slots at [g*M, (g+1)*M).
        mask: (B*G, 1, Lc, M + S) additive, chunk-major.
    Returns:
        (B, H, T, D).
    """
    bsz, n_head, seq_len, head_dim = q.shape
    n_kv, ctx_len = k.shape[1], k.shape[2]
    chunk_len = mask.shape[2]
    per_group = memory[0].shape[2] // chunks
    # Token-major queries (as projected) split into chunks without a copy when T == G*Lc.
    q = q.transpose(1, 2)  # (B, T, H, D)
    if seq_len < chunks * chunk_len:
        q = F.pad(q, (0, 0, 0, 0, 0, chunks * chunk_len - seq_len))
    q = q.reshape(bsz * chunks, chunk_len, n_head, head_dim).transpose(1, 2)  # (B*G, H, Lc, D)

    def per_chunk(mem: Tensor, ctx: Tensor) -> Tensor:  # -> (B*G, H_kv, M + S, D)
        mem = mem.view(bsz, n_kv, chunks, per_group, head_dim).transpose(1, 2)  # (B, G, H_kv, M, D)
        ctx = ctx[:, None].expand(bsz, chunks, n_kv, ctx_len, head_dim)  # (B, G, H_kv, S, D)
        return torch.cat([mem, ctx], dim=3).view(bsz * chunks, n_kv, per_group + ctx_len, head_dim)

    y = attend(q, per_chunk(memory[0], k), per_chunk(memory[1], v), mask)  # (B*G, H, Lc, D)
    y = y.transpose(1, 2).reshape(bsz, chunks * chunk_len, n_head, head_dim)  # (B, G*Lc, H, D)
    return y[:, :seq_len].transpose(1, 2)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA of (B, H, T, D) queries over (B, H_kv, S, D) keys and values -> (B, H, T, D); causal without a mask.

    Query head i reads KV head i // (H / H_kv). CUDA has no fused kernel for GQA with a mask (flash
    takes no mask, the memory-efficient kernel no GQA): SDPA would silently take its math kernel,
    which upcasts to fp32 and materializes all B*H*T*S scores. There the KV heads are repeated
    instead, as HF does; with one query per sequence (a decode step) the query heads of a KV head
    become its query rows instead, and nothing is repeated. The CPU's fused kernel takes both.
    """
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and not fused_masked_gqa(q.device):
        bsz, n_head, seq_len, head_dim = q.shape
        if seq_len == 1 and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1:
            # One query per sequence (a decode step): a KV head's query heads become its query rows,
            # so K/V are read as they are, not repeated; the mask (B, 1, 1, S) broadcasts over them.
            n_kv = k.shape[1]
            q = q.reshape(bsz, n_kv, n_head // n_kv, head_dim)  # (B, H_kv, H / H_kv, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return y.reshape(bsz, n_head, 1, head_dim)
        k, v = repeat_kv(k, n_head), repeat_kv(v, n_head)  # (B, H, S, D)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def fused_masked_gqa(device: torch.device) -> bool:
    """Whether SDPA has a fused kernel for GQA with a mask on this device (not on CUDA)."""
    return device.type != "cuda"


def repeat_kv(x: Tensor, n_head: int) -> Tensor:
    """(B, H_kv, S, D) -> (B, H, S, D), each KV head repeated for the H / H_kv query heads it serves."""
    bsz, n_kv, seq_len, head_dim = x.shape
    x = x.unsqueeze(2).expand(bsz, n_kv, n_head // n_kv, seq_len, head_dim)
    return x.reshape(bsz, n_head, seq_len, head_dim)


def additive_mask(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean visibility -> additive attention bias: 0 where visible, -inf elsewhere."""
    return torch.full(visible.shape, float("-inf"), dtype=dtype, device=visible.device).masked_fill_(visible, 0.0)


def _joined(parts: Sequence[Tensor], dim: int, device: torch.device) -> Tensor:
    """torch.cat of `parts`, on `device`; host parts bound for a CUDA device are joined in pinned
    memory and copied asynchronously (the caching host allocator keeps the buffer until the copy is done)."""
    if device.type != "cuda" or any(p.device.type != "cpu" for p in parts):
        return torch.cat(list(parts), dim=dim).to(device)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))  # as torch.cat promotes
    staged = torch.empty(shape, dtype=dtype, pin_memory=True)
    torch.cat(list(parts), dim=dim, out=staged)
    return staged.to(device, non_blocking=True)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D)."""
    return x * cos + rotate_half(x) * sin
