"""One ArchSpec per model family: how to cut a transformers model into exportable blocks.

Every family is cut into the same kinds of block, with the same interface names, so that the
SDK can compose any contiguous range of them without knowing the family:

    embed      input_ids (B,T) int64 [, position_ids (B,T) int64]      -> h0 (B,T,H)
    layer i    h{i}, position_ids, attention_mask (B,1,T,P+T) additive,
               past_key.{i}, past_value.{i} (B,KV,P,D)                 -> h{i+1}, present_key.{i}, present_value.{i}
    head       h{L} (B,T,H)                                            -> logits (B,T,V)
    head_last  h{L} (B,T,H)                                            -> logits (B,1,V)   (last position only)

Llama-family layers are by default not exported from these modules but built from the weights
as fused ONNX Runtime kernels (splitllm_export.fused): their interface takes ``seqlens_k`` (B,)
and ``total_seq_len`` () int32 in place of ``position_ids`` and ``attention_mask``.

The attention core is written here (explicit KV concat, additive mask) instead of calling the
transformers attention module, because the latter threads a Cache object through that the
TorchScript exporter cannot trace; projections, norms and MLPs are the model's own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitllm.errors import UnsupportedArchitecture
from splitllm.model.bundle import ModelShapes


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    # (B, T, N*D) -> (B, N, T, D)
    return x.reshape(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    # (B, N, T, D) -> (B, T, N*D)
    x = x.transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Scaled dot-product attention with GQA. q (B,Nq,T,D), k/v (B,Nkv,S,D), mask (B,1,T,S)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + mask  # (B, Nq, T, S)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)  # (B, Nq, T, D)


def _tied_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B,T,H) @ weight (V,H)^T as one ONNX Gemm with transB=1.

    On a 2-D input with a bias the exporter emits Gemm(transB=1), which ONNX Runtime prepacks
    without copying the weight, and which keeps the weight in its stored (V, H) orientation so a
    tied head shares the embedding's initializer. (A 3-D input or no bias gives Transpose +
    MatMul: ORT then transposes the 113 MB SmolLM2 table on every run.)
    """
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    y = nn.functional.linear(x.reshape(-1, x.shape[-1]), weight, bias)  # (B*T, V)
    return y.reshape(x.shape[0], x.shape[1], -1)  # (B, T, V)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ----------------------------------------------------------------------------- Llama family


class _LlamaEmbed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = model.model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (B, T, H)


class _LlamaLayer(nn.Module):
    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        cfg = model.config
        self.layer = model.model.layers[index]
        self.rotary = model.model.rotary_emb
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5

    def forward(self, hidden, position_ids, attention_mask, past_key, past_value):  # noqa: ANN001
        attn = self.layer.self_attn
        x = self.layer.input_layernorm(hidden)
        q = _split_heads(attn.q_proj(x), self.head_dim)  # (B, Nq, T, D)
        k = _split_heads(attn.k_proj(x), self.head_dim)  # (B, Nkv, T, D)
        v = _split_heads(attn.v_proj(x), self.head_dim)
        cos, sin = self.rotary(x, position_ids)  # (B, T, D) each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat([past_key, k], dim=2)  # (B, Nkv, P+T, D)
        v = torch.cat([past_value, v], dim=2)
        out = attn.o_proj(_merge_heads(_attend(q, k, v, attention_mask, self.scale)))
        hidden = hidden + out
        hidden = hidden + self.layer.mlp(self.layer.post_attention_layernorm(hidden))
        return hidden, k, v


class _LlamaHead(nn.Module):
    def __init__(self, model: nn.Module, last_only: bool) -> None:
        super().__init__()
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.last_only = last_only

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.last_only:
            hidden = hidden[:, -1:, :]
        return _tied_linear(self.norm(hidden), self.lm_head.weight, self.lm_head.bias)


# ----------------------------------------------------------------------------- GPT-2 family


class _GPT2Embed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.wte = model.transformer.wte
        self.wpe = model.transformer.wpe

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids) + self.wpe(position_ids)  # (B, T, H)


class _GPT2Layer(nn.Module):
    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        cfg = model.config
        self.block = model.transformer.h[index]
        self.embed_dim = cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(index + 1)
        self.scale = scale

    def forward(self, hidden, attention_mask, past_key, past_value):  # noqa: ANN001
        attn = self.block.attn
        qkv = attn.c_attn(self.block.ln_1(hidden))  # (B, T, 3H)
        q, k, v = qkv.split(self.embed_dim, dim=2)
        q, k, v = (_split_heads(t, self.head_dim) for t in (q, k, v))
        k = torch.cat([past_key, k], dim=2)  # (B, N, P+T, D)
        v = torch.cat([past_value, v], dim=2)
        out = attn.c_proj(_merge_heads(_attend(q, k, v, attention_mask, self.scale)))
        hidden = hidden + out
        hidden = hidden + self.block.mlp(self.block.ln_2(hidden))
        return hidden, k, v


class _GPT2Head(nn.Module):
    def __init__(self, model: nn.Module, last_only: bool) -> None:
        super().__init__()
        self.ln_f = model.transformer.ln_f
        self.lm_head = model.lm_head
        self.last_only = last_only

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.last_only:
            hidden = hidden[:, -1:, :]
        return _tied_linear(self.ln_f(hidden), self.lm_head.weight, self.lm_head.bias)


# ----------------------------------------------------------------------------- registry


# The exporter reads the same dimensions the bundle records and the SDK uses.
Shapes = ModelShapes


@dataclass(frozen=True)
class ArchSpec:
    """How one model family is cut into blocks (see the module docstring for the interface)."""

    family: str
    model_types: tuple[str, ...]
    shapes: Callable[[Any], Shapes]
    embed: Callable[[nn.Module], nn.Module]
    layer: Callable[[nn.Module, int], nn.Module]
    head: Callable[[nn.Module, bool], nn.Module]
    embed_uses_positions: bool
    layer_uses_positions: bool


def _llama_shapes(cfg: Any) -> Shapes:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Shapes(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_context=cfg.max_position_embeddings,
    )


def _gpt2_shapes(cfg: Any) -> Shapes:
    return Shapes(
        num_layers=cfg.n_layer,
        hidden_size=cfg.n_embd,
        num_heads=cfg.n_head,
        num_kv_heads=cfg.n_head,
        head_dim=cfg.n_embd // cfg.n_head,
        intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
        vocab_size=cfg.vocab_size,
        max_context=cfg.n_positions,
    )


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        family="llama",
        model_types=("llama",),
        shapes=_llama_shapes,
        embed=_LlamaEmbed,
        layer=_LlamaLayer,
        head=_LlamaHead,
        embed_uses_positions=False,
        layer_uses_positions=True,
    ),
    "gpt2": ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        shapes=_gpt2_shapes,
        embed=_GPT2Embed,
        layer=_GPT2Layer,
        head=_GPT2Head,
        embed_uses_positions=True,
        layer_uses_positions=False,
    ),
}


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHS.values() for t in spec.model_types)


def spec_for(config: Any) -> ArchSpec:
    """The ArchSpec for a transformers config, or UnsupportedArchitecture naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    rope_type = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedArchitecture(
            f"cannot split {model_type!r} with rope_scaling type {rope_type!r}: its rotary "
            "frequencies depend on the sequence length, which a fixed graph cannot follow"
        )
    for spec in ARCHS.values():
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitecture(
        f"cannot split architecture {model_type!r}: supported model types are "
        + ", ".join(supported_model_types())
    )
