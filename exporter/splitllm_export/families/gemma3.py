"""Gemma 3 (text): q/k norms, norms before and after attention and MLP, (1 + w) RMSNorm scales,
tanh-GELU gate, sqrt(hidden)-scaled embeddings, tied head, and sliding-window layers with their
own rotary base; fused layers."""

from __future__ import annotations

from typing import Any

from splitllm_export.graphs.arch import DecoderLayout
from splitllm_export.graphs.layers import decoder_spec, layer_types_window


def _norm_weight(module: Any) -> Any:
    return 1.0 + module.weight.detach().float().numpy()  # Gemma3RMSNorm scales by (1 + w)


def _rotary(model: Any, index: int) -> Any:
    if model.config.layer_types[index] == "sliding_attention":
        return model.model.rotary_emb_local  # rope_local_base_freq
    return model.model.rotary_emb


def tiny_config(vocab_size: int, num_layers: int) -> Any:
    from transformers import Gemma3TextConfig

    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        max_position_embeddings=512, sliding_window=8, layer_types=types, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, tie_word_embeddings=True, initializer_range=0.1,
        bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )


SPEC = decoder_spec(
    "gemma3", ("gemma3_text",), ("gemma3",),
    DecoderLayout(qk_norm=("q_norm", "k_norm"), attn_out_norm="post_attention_layernorm",
                  mlp_in_norm="pre_feedforward_layernorm", mlp_out_norm="post_feedforward_layernorm",
                  norm_weight=_norm_weight, rotary=_rotary, window=layer_types_window),
    tiny_config,
    notes="fused layers: local layers use local_window_size and the local rotary tables; FastGelu for the gate",
)
