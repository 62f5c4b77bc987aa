"""Llama (SmolLM2, Llama 2/3): RMSNorm, SiLU-gated MLP, rotary, optional GQA; fused layers."""

from __future__ import annotations

from typing import Any

from splitllm_export.graphs.arch import DecoderLayout
from splitllm_export.graphs.layers import decoder_spec


def tiny_config(vocab_size: int, num_layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.1, rope_theta=10000.0,
        bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )


SPEC = decoder_spec("llama", ("llama",), ("llama",), DecoderLayout(), tiny_config)
