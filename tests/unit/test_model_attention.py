"""Masked GQA attention takes a fused kernel on CUDA: no `enable_gqa` beside a mask there."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memory3.model import model as model_module
from memory3.model.model import attend, repeat_kv


class RecordingSdpa:
    """Stands in for SDPA (or wraps it): records the KV heads and flags of each call."""

    def __init__(self, sdpa=None):
        self.calls, self.sdpa = [], sdpa

    def __call__(self, q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        self.calls.append({"kv_heads": k.shape[1], "mask": attn_mask is not None, "enable_gqa": enable_gqa})
        if self.sdpa is None:
            return q.new_empty(q.shape)
        return self.sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)


def fake_cuda_attention(attention, x, cos, sin, mask):
    """A block's attention (no caches) on fake CUDA tensors in bf16, which run on a CPU."""
    params = {name: torch.empty(p.shape, device="cuda", dtype=torch.bfloat16)
              for name, p in attention.named_parameters()}
    return torch.func.functional_call(attention, params, (x, cos, sin, mask, None, None, x.shape[1]))


def test_masked_gqa_on_cuda_repeats_the_kv_heads(tiny_model, tiny_config, monkeypatch):
    """A prefill's additive mask with GQA: without repeated KV heads, SDPA on CUDA would take its
    math kernel (fp32 scores of every query and key). Without a mask (causal) GQA stays fused."""
    sdpa = RecordingSdpa()
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", sdpa)
    h, h_kv, d, t = tiny_config.n_head, tiny_config.n_kv_head, tiny_config.head_dim, 10
    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda = {"device": "cuda", "dtype": torch.bfloat16}
        x, rope = torch.empty(2, t, tiny_config.dim, **cuda), torch.empty(2, 1, t, d, **cuda)
        fake_cuda_attention(tiny_model.layers[0].attention, x, rope, rope, None)
        fake_cuda_attention(tiny_model.layers[0].attention, x, rope, rope, torch.zeros(2, 1, t, t, **cuda))
        attend(torch.empty(2, h, t, d, **cuda), torch.empty(2, h_kv, 12, d, **cuda),
               torch.empty(2, h_kv, 12, d, **cuda), torch.zeros(2, 1, t, 12, **cuda))
    assert sdpa.calls == [{"kv_heads": h_kv, "mask": False, "enable_gqa": True},
                          {"kv_heads": h, "mask": True, "enable_gqa": False},
                          {"kv_heads": h, "mask": True, "enable_gqa": False}]


def test_chunk_attention_takes_the_same_rule_and_the_same_result(tiny_config, monkeypatch):
    """chunk_attention (a prefill of whole chunks with memories) repeats the KV heads where SDPA
    has no fused kernel for masked GQA, and computes what GQA computes."""
    h, h_kv, d, lc, m = tiny_config.n_head, tiny_config.n_kv_head, tiny_config.head_dim, 4, 3
    q, kv = torch.randn(1, h, 2 * lc, d), torch.randn(1, h_kv, 2 * lc, d)
    memory = (torch.randn(1, h_kv, 2 * m, d), torch.randn(1, h_kv, 2 * m, d))
    mask = torch.zeros(2, 1, lc, m + 2 * lc)
    expected = model_module.chunk_attention(q, kv, kv, memory, mask, 2)
    monkeypatch.setattr(model_module, "fused_masked_gqa", lambda device: False)  # as on CUDA
    sdpa = RecordingSdpa(F.scaled_dot_product_attention)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", sdpa)
    torch.testing.assert_close(model_module.chunk_attention(q, kv, kv, memory, mask, 2), expected)
    assert sdpa.calls == [{"kv_heads": h, "mask": True, "enable_gqa": False}]


@pytest.mark.parametrize("masked", [False, True])
def test_repeated_kv_heads_attend_as_gqa_does(masked):
    """Query head i reads KV head i // G, as `enable_gqa` has it."""
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = torch.randn(2, 1, 5, 7) if masked else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    repeated = F.scaled_dot_product_attention(q, repeat_kv(k, 8), repeat_kv(v, 8), attn_mask=mask)
    torch.testing.assert_close(repeated, expected)
    torch.testing.assert_close(repeat_kv(k, 8), k.repeat_interleave(4, dim=1))
    if masked:  # on the CPU the fused kernel takes both
        torch.testing.assert_close(attend(q, k, v, mask), expected)
