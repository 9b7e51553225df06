"""Export to the Hugging Face Llama layout.

With no memories the Memory3 backbone is a Llama, so a checkpoint can be loaded into
`transformers.LlamaForCausalLM` for tools that only speak that format (and for the parity test).
This module does not import transformers: it returns plain dicts.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .config import Memory3Config


def llama_config_kwargs(config: Memory3Config) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` describing the same backbone."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_positions(prefix_len=0),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }


def to_llama_state_dict(state_dict: dict[str, Tensor], config: Memory3Config) -> dict[str, Tensor]:
    """Rename (and split the fused qkv of) a Memory3 state dict into Llama's names."""
    q_size, kv_size = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    out: dict[str, Tensor] = {
        "model.embed_tokens.weight": state_dict["tok_embeddings.weight"],
        "model.norm.weight": state_dict["norm.weight"],
        "lm_head.weight": state_dict["output.weight"],
    }
    for i in range(config.n_layer):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state_dict[src + "attention.wqkv.weight"].split([q_size, kv_size, kv_size], dim=0)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.o_proj.weight"] = state_dict[src + "attention.wo.weight"]
        out[dst + "mlp.gate_proj.weight"] = state_dict[src + "feed_forward.w1.weight"]
        out[dst + "mlp.up_proj.weight"] = state_dict[src + "feed_forward.w3.weight"]
        out[dst + "mlp.down_proj.weight"] = state_dict[src + "feed_forward.w2.weight"]
        out[dst + "input_layernorm.weight"] = state_dict[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state_dict[src + "ffn_norm.weight"]
    return out
