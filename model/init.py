"""Randomly initialised models, for tests, demos and benchmarks before a trained release exists."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Memory3Config
from .model import RotaryEmbedding, Transformer


def init_weights(model: Transformer, *, seed: int = 0, std: float = 0.02) -> Transformer:
    """Normal(0, std) linear/embedding weights, output projections scaled by 1/sqrt(2*n_layer)."""
    generator = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * model.config.n_layer)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(param)
            continue
        scale = out_std if name.endswith(("wo.weight", "w2.weight")) else std
        with torch.no_grad():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def random_model(config: Memory3Config, *, seed: int = 0, std: float = 0.02,
                 device: str | torch.device = "cpu") -> Transformer:
    """The same weights on any device: drawn on the CPU, a parameter at a time, into a model made on
    `device` (built on the meta device first, so torch's own initialisation, slow on a CPU for a large
    preset, never runs), so that host memory never holds a whole large model bound for a GPU."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    model.rope = RotaryEmbedding(config.head_dim, config.rope_theta)  # rebuilt off the meta device
    return init_weights(model, seed=seed, std=std).eval()
