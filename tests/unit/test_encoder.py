"""Sparsification picks the true top-k by received attention; kept keys are post-RoPE."""

import dataclasses
import math

import pytest
import torch

from memory3.model.encoder import encode_batch, encode_references, received_attention, top_k_tokens
from memory3.model.init import random_model


def brute_force_received(q, k, n_valid, reduction):
    """Loops over heads and tokens; q: (H, L, D), k: (H_kv, L, D) without RoPE."""
    n_head, _, head_dim = q.shape
    n_kv = k.shape[0]
    group = n_head // n_kv
    out = torch.full((n_kv, q.shape[1]), float("-inf"))
    for kv in range(n_kv):
        per_head = []
        for h in range(kv * group, (kv + 1) * group):
            received = torch.zeros(n_valid)
            for i in range(n_valid):
                w = torch.softmax(torch.stack([q[h, i] @ k[kv, j] for j in range(n_valid)]) / math.sqrt(head_dim), 0)
                received += w
            per_head.append(received)
        stacked = torch.stack(per_head)
        out[kv, :n_valid] = stacked.sum(0) if reduction == "sum" else stacked.max(0).values
    return out


@pytest.mark.parametrize("reduction", ["sum", "max"])
def test_received_attention_matches_brute_force(reduction):
    q, k = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8)
    lengths = [12, 7]
    valid = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    fast = received_attention(q, k, valid, reduction)
    for n in range(2):
        torch.testing.assert_close(fast[n], brute_force_received(q[n], k[n], lengths[n], reduction))


def test_top_k_is_the_true_top_k_in_position_order():
    scores = torch.randn(3, 2, 20)
    valid = torch.arange(20)[None] < torch.tensor([20, 20, 6])[:, None]
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    index = top_k_tokens(scores, valid, 8)
    for n in range(2):
        for h in range(2):
            best = sorted(sorted(range(20), key=lambda j: -scores[n, h, j])[:8])
            assert index[n, h].tolist() == best
    # A 6-token reference keeps all 6 tokens, then two padding slots.
    assert index[2, 0].tolist()[:6] == list(range(6)) and index[2, 0].tolist()[6:] == [-1, -1]


def test_encoder_keeps_the_tokens_that_receive_most_attention(tiny_model, tiny_config, prefix):
    ref = torch.randint(3, 250, (50,)).tolist()
    with torch.no_grad():
        mem = encode_references(tiny_model, [ref], prefix)[0]
        # Recompute the scores independently: hidden states from a plain causal forward.
        tokens = torch.tensor([prefix + ref])
        x = tiny_model.tok_embeddings(tokens)
        positions = torch.arange(tokens.shape[1])[None]
        cos, sin = tiny_model.rope(positions, x.dtype)
        for i, layer in enumerate(tiny_model.layers[: max(tiny_config.memory_layers) + 1]):
            if i in tiny_config.memory_layers:
                q, k, _ = layer.attention.project(layer.attention_norm(x))
                slot = tiny_config.memory_layers.index(i)
                for kv in range(tiny_config.n_kv_head):
                    scores = brute_force_received(q[0, :, len(prefix):], k[0, :, len(prefix):], len(ref), "sum")
                    expected = sorted(scores[kv].topk(tiny_config.mem_tokens_per_head).indices.tolist())
                    assert mem.positions[slot, kv].tolist() == expected
            x = layer(x, cos, sin, None, None, None, x.shape[1])


def test_kept_keys_are_post_rope_at_their_encoding_position(tiny_model, tiny_config, prefix):
    ref = torch.randint(3, 250, (tiny_config.ref_len,)).tolist()
    tokens = torch.tensor([prefix + ref])
    slots = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        mem = encode_references(tiny_model, [ref], prefix)[0]
        # The KV cache of an ordinary forward pass over the same text holds post-RoPE keys.
        tiny_model.setup_caches(1, tokens.shape[1], memory=False)
        try:
            tiny_model(tokens, slots, cache_slots=slots)
            for slot, layer_index in enumerate(tiny_config.memory_layers):
                cache = tiny_model.layers[layer_index].attention.kv_cache
                for kv in range(tiny_config.n_kv_head):
                    idx = mem.positions[slot, kv] + len(prefix)
                    torch.testing.assert_close(mem.keys[slot, kv], cache.k[0, kv, idx], rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(mem.values[slot, kv], cache.v[0, kv, idx], rtol=1e-5, atol=1e-5)
        finally:
            tiny_model.clear_caches()
        # ... and they are not the keys before rotation.
        layer = tiny_model.layers[tiny_config.memory_layers[0]]
        _, pre_rope, _ = layer.attention.project(layer.attention_norm(tiny_model.tok_embeddings(tokens)))
        idx = mem.positions[0, 0] + len(prefix)
        assert (pre_rope[0, 0, idx] - mem.keys[0, 0]).abs().max() > 1e-3


def test_batched_encoding_equals_one_at_a_time(tiny_model, prefix):
    refs = [torch.randint(3, 250, (n,)).tolist() for n in (128, 9, 60)]
    with torch.no_grad():
        batched = encode_references(tiny_model, refs, prefix)
        alone = [encode_references(tiny_model, [r], prefix)[0] for r in refs]
    for a, b in zip(batched, alone, strict=True):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


def test_short_reference_pads_the_tail(tiny_model, tiny_config, prefix):
    with torch.no_grad():
        mem = encode_references(tiny_model, [[5, 6, 7]], prefix)[0]
    assert mem.positions[..., :3].tolist() == [[[0, 1, 2]] * tiny_config.n_kv_head] * tiny_config.n_memory_layers
    assert (mem.positions[..., 3:] == -1).all()
    assert mem.keys[..., 3:, :].abs().sum() == 0 and mem.values[..., 3:, :].abs().sum() == 0


def test_max_reduction_can_pick_other_tokens(tiny_config, prefix):
    model = random_model(dataclasses.replace(tiny_config, score_reduction="max"), seed=1, std=0.2)
    summed = random_model(tiny_config, seed=1, std=0.2)
    refs = [torch.randint(3, 250, (128,)).tolist() for _ in range(4)]
    with torch.no_grad():
        a = encode_batch(model, refs, prefix)[2]
        b = encode_batch(summed, refs, prefix)[2]
    assert not torch.equal(a, b)


def test_encoder_rejects_bad_references(tiny_model, tiny_config, prefix):
    with pytest.raises(ValueError, match="no references"):
        encode_references(tiny_model, [], prefix)
    with pytest.raises(ValueError, match="empty reference"):
        encode_references(tiny_model, [[1, 2], []], prefix)
    with pytest.raises(ValueError, match="exceeds ref_len"):
        encode_references(tiny_model, [[3] * (tiny_config.ref_len + 1)], prefix)
