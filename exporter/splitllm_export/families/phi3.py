"""Phi-3: packed qkv_proj and gate_up_proj, optional sliding window; fused layers (full-width rotary)."""

from __future__ import annotations

from typing import Any

from splitllm_export.graphs.arch import DecoderLayout
from splitllm_export.graphs.layers import config_window, decoder_spec


def tiny_config(vocab_size: int, num_layers: int) -> Any:
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512,
        sliding_window=12, tie_word_embeddings=False, initializer_range=0.1, rope_theta=10000.0,
        bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )


SPEC = decoder_spec("phi3", ("phi3",), ("phi3",), DecoderLayout(qkv=("qkv_proj",), gate_up=("gate_up_proj",),
                                                               window=config_window), tiny_config,
                    notes="fused layers (packed weights used as they are); partial rotary (Phi-4-mini) "
                    "keeps the exported graph; longrope scaling is refused")
