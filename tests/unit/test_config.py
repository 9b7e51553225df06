import dataclasses

import pytest
import torch

from memory3.model.config import PRESETS, ConfigError, Memory3Config
from memory3.model.model import Transformer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    config = Memory3Config.from_name(name)
    assert Memory3Config.from_json(config.to_json()) == config


def test_paper_preset_matches_the_paper():
    c = Memory3Config.from_name("paper-2.4b")
    assert (c.n_layer, c.dim, c.n_head, c.n_kv_head, c.head_dim) == (44, 3200, 40, 8, 80)
    assert c.intermediate_size == 3200 and c.vocab_size == 60416
    assert c.memory_layers == tuple(range(22))
    assert (c.ref_len, c.mem_tokens_per_head, c.chunk_len, c.mems_per_chunk) == (128, 8, 64, 5)
    with torch.device("meta"):
        model = Transformer(c)
    non_embedding = sum(p.numel() for n, p in model.named_parameters()
                        if not n.startswith(("tok_embeddings", "output")) and "norm" not in n)
    # Paper §3.4: 44 * (2d^2 + 2*d*640 + 3*d*W) = 2.433B non-embedding parameters.
    assert non_embedding == 44 * (2 * 3200**2 + 2 * 3200 * 640 + 3 * 3200 * 3200)


def test_memory_layers_default_to_first_half():
    assert Memory3Config(n_layer=6, dim=64, n_head=4, n_kv_head=2, head_dim=16).memory_layers == (0, 1, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_kv_head": 3}, "must divide n_head"),
        ({"head_dim": 8}, r"n_head\*head_dim must equal dim"),
        ({"memory_layers": (0, 9)}, "out of range"),
        ({"memory_layers": (1, 0)}, "sorted and unique"),
        ({"mem_tokens_per_head": 400, "ref_len": 128}, "exceeds ref_len"),
        ({"score_reduction": "median"}, "score_reduction"),
        ({"vocab_size": 0}, "positive integer"),
        ({"norm_eps": "1e-5"}, "norm_eps must be a positive number"),
        ({"rope_theta": None}, "rope_theta must be a positive number"),
        ({"rope_theta": float("nan")}, "rope_theta must be a positive number"),
        ({"memory_layers": 3}, "memory_layers must be a list of layer numbers"),
        ({"memory_layers": [0.7, 1.9]}, "memory_layers must be a list of layer numbers"),  # was truncated to (0, 1)
        ({"memory_layers": []}, "memory_layers is empty"),
        ({"reference_prefix": 5}, "reference_prefix must be a string"),
    ],
)
def test_invalid_configs_say_what_is_wrong(overrides, message):
    base = Memory3Config.from_name("tiny")
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(base, **overrides)


def test_unknown_preset_and_unknown_keys():
    with pytest.raises(ConfigError, match="unknown preset"):
        Memory3Config.from_name("huge")
    with pytest.raises(ConfigError, match="unknown config keys"):
        Memory3Config.from_dict({"n_layers": 4})
    with pytest.raises(ConfigError, match="not valid JSON"):
        Memory3Config.from_json("{")
