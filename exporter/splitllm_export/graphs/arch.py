"""What the exporter knows about one model family: :class:`ArchSpec` and :class:`DecoderLayout`.

Every family is cut into the same kinds of block, with the same interface names, so that the
SDK can compose any contiguous range of them without knowing the family:

    embed      input_ids (B,T) int64 [, position_ids (B,T) int64]      -> h0 (B,T,H)
    layer i    h{i}, position_ids, attention_mask (B,1,T,P+T) additive,
               past_key.{i}, past_value.{i} (B,KV,P,D)                 -> h{i+1}, present_key.{i}, present_value.{i}
    head       h{L} (B,T,H)                                            -> logits (B,T,V)
    head_last  h{L} (B,T,H)                                            -> logits (B,1,V)   (last position only)

Layers of a family with a :class:`DecoderLayout` can instead be built from the weights as fused
ONNX Runtime kernels (``splitllm_export.graphs.fused``): their interface takes ``seqlens_k`` (B,) and
``total_seq_len`` () int32 in place of ``position_ids`` and ``attention_mask``.

One file per family under ``splitllm_export/families`` fills in an ArchSpec; the registry
(``splitllm_export.graphs.registry``) collects them. Nothing outside a family file names a family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from splitllm.model.bundle import ModelShapes

# The exporter reads the same dimensions the bundle records and the SDK uses.
Shapes = ModelShapes


def _no_window(config: Any, index: int) -> int | None:
    return None


def _rotary(model: Any, index: int) -> Any:
    return model.model.rotary_emb


def _norm_weight(module: Any) -> Any:
    return module.weight.detach().float().numpy()


@dataclass(frozen=True)
class DecoderLayout:
    """Where a Llama-shaped decoder layer keeps its parts (attribute names in transformers).

    ``model.model.layers[i]`` holds ``self_attn`` and ``mlp``; a layer computes

        h = h + attn_out_norm(o_proj(attention(rope(qk_norm(qkv(input_norm(h)))))))
        h = h + mlp_out_norm(down(act(gate) * up))            with gate, up from mlp_in_norm(h)

    where the optional norms are absent (``None``) in most families. One name in ``qkv`` or
    ``gate_up`` means the projections are packed in one matrix (q|k|v, gate|up).
    """

    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    o_proj: str = "o_proj"
    qk_norm: tuple[str, str] | None = None
    input_norm: str = "input_layernorm"
    attn_out_norm: str | None = None
    mlp_in_norm: str = "post_attention_layernorm"
    mlp_out_norm: str | None = None
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    down: str = "down_proj"
    # RMSNorm scale as stored -> the multiplier applied (Gemma stores w and multiplies by 1 + w).
    norm_weight: Callable[[Any], Any] = _norm_weight
    # The rotary module that layer ``index`` uses (Gemma 3: a local one on sliding layers).
    rotary: Callable[[Any, int], Any] = _rotary
    # Sliding-window width of layer ``index`` (keys at distance < window are seen), or None.
    window: Callable[[Any, int], int | None] = _no_window


@dataclass(frozen=True)
class ArchSpec:
    """Everything family-specific the exporter needs, for one architecture.

    ``model_types`` are transformers ``config.model_type`` values, ``gguf_archs`` the GGUF
    ``general.architecture`` values this entry reads. ``embed``/``layer``/``head`` build the torch
    modules exported as blocks. ``layout`` (None for non-Llama-shaped families) describes the
    decoder layer for the generic layer module and for the fused ONNX Runtime layer; ``fused``
    says whether the fused form is used for this family at all. ``tiny_config(vocab, layers)``
    is a transformers config for a random-weight test model; ``reference(config)`` builds the
    transformers model the export is validated against.
    """

    family: str
    model_types: tuple[str, ...]
    gguf_archs: tuple[str, ...]
    shapes: Callable[[Any], Shapes]
    embed: Callable[[Any], Any]
    layer: Callable[[Any, int], Any]
    head: Callable[[Any, bool], Any]
    embed_uses_positions: bool
    layer_uses_positions: bool
    tiny_config: Callable[[int, int], Any]
    reference: Callable[[Any], Any]
    layout: DecoderLayout | None = None
    fused: bool = False
    notes: str = ""
