"""Randomly initialised models, for tests, demos and benchmarks before a trained release exists."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Memory3Config
from .model import Transformer


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


def random_model(config: Memory3Config, *, seed: int = 0, std: float = 0.02) -> Transformer:
    return init_weights(Transformer(config), seed=seed, std=std).eval()
