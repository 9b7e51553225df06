"""CUDA parity: the model computes the same logits on the GPU as on the CPU (skipped without CUDA)."""

import pytest
import torch

from memory3.model.generate import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_forward_matches_cpu(tiny_model, tiny_config):
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 100))
    positions = torch.arange(100)[None].expand(2, -1)
    with torch.no_grad():
        cpu = tiny_model(tokens, positions)
        gpu_model = tiny_model.to("cuda")
        try:
            gpu = gpu_model(tokens.cuda(), positions.cuda()).cpu()
            out = generate(gpu_model, [[1, 5, 6, 7]], max_new_tokens=8)
        finally:
            tiny_model.to("cpu")
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
    assert len(out.tokens[0]) == 8
