"""Qwen3: the Llama layout with an RMSNorm over each head of q and k before rotary; fused layers."""

from __future__ import annotations

from typing import Any

from splitllm_export.graphs.arch import DecoderLayout
from splitllm_export.graphs.layers import decoder_spec, layer_types_window


def tiny_config(vocab_size: int, num_layers: int) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.1, rope_theta=1_000_000.0,
        bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )


SPEC = decoder_spec("qwen3", ("qwen3",), ("qwen3",),
                    DecoderLayout(qk_norm=("q_norm", "k_norm"), window=layer_types_window), tiny_config,
                    notes="fused layers; q/k norms as per-head SimplifiedLayerNormalization before GroupQueryAttention")
