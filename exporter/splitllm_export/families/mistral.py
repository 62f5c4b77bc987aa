"""Mistral: the Llama layout with a sliding window on every layer; fused layers (local_window_size)."""

from __future__ import annotations

from typing import Any

from splitllm_export.graphs.arch import DecoderLayout
from splitllm_export.graphs.layers import config_window, decoder_spec


def tiny_config(vocab_size: int, num_layers: int) -> Any:
    from transformers import MistralConfig

    # A window of 8 keys is far shorter than the validation prompt, so the window is exercised.
    return MistralConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        sliding_window=8, tie_word_embeddings=False, initializer_range=0.1, rope_theta=10000.0,
        bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )


SPEC = decoder_spec("mistral", ("mistral",), (), DecoderLayout(window=config_window), tiny_config,
                    notes="fused layers; the sliding window is GroupQueryAttention's local_window_size "
                    "(a GGUF of Mistral says 'llama' and loads through that entry)")
