"""Torch modules the blocks are exported from, shared by the families' registry entries.

The attention core is written here (explicit KV concat, additive mask) instead of calling the
transformers attention module, because the latter threads a Cache object through that the
TorchScript exporter cannot trace; projections, norms and MLPs are the model's own modules.
:class:`DecoderLayer` serves every Llama-shaped family through its :class:`DecoderLayout`
(q/k/v biases, q/k norms, packed projections, extra norms, sliding windows, local rotary).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from splitllm_export.graphs.arch import ArchSpec, DecoderLayout, Shapes


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    # (B, T, N*D) -> (B, N, T, D)
    return x.reshape(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    # (B, N, T, D) -> (B, T, N*D)
    x = x.transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], -1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA. q (B,Nq,T,D), k/v (B,Nkv,S,D), mask (B,1,T,S).

    ``softcap`` bounds the scores as tanh(s / c) * c before the mask (Gemma 2's logit softcap).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Nq, T, S)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v)  # (B, Nq, T, D)


def tied_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B,N,T,D) by cos/sin (B,1,T,R); with R < D only the first R dims turn (partial rotary)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)


def _part(owner: nn.Module, name: str | None) -> nn.Module | None:
    return None if name is None else getattr(owner, name)


# ----------------------------------------------------------------------------- Llama-shaped families


class DecoderEmbed(nn.Module):
    """The token embedding (Gemma's scaled embedding module includes its scale)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = model.model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (B, T, H)


class DecoderLayer(nn.Module):
    """Decoder layer ``index`` of a Llama-shaped model, read through ``layout``."""

    def __init__(self, model: nn.Module, index: int, layout: DecoderLayout) -> None:
        super().__init__()
        cfg = model.config
        self.layout = layout
        self.layer = model.model.layers[index]
        self.rotary = layout.rotary(model, index)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.q_width = cfg.num_attention_heads * self.head_dim
        self.kv_width = (cfg.num_key_value_heads or cfg.num_attention_heads) * self.head_dim
        self.scale = float(getattr(self.layer.self_attn, "scaling", None) or self.head_dim**-0.5)
        self.softcap = getattr(cfg, "attn_logit_softcapping", None)
        self.window = layout.window(cfg, index)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, names = self.layer.self_attn, self.layout.qkv
        if len(names) == 1:
            q, k, v = getattr(attn, names[0])(x).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
            return q, k, v
        q, k, v = (getattr(attn, n)(x) for n in names)
        return q, k, v

    def _mask(self, mask: torch.Tensor, position_ids: torch.Tensor, total: int) -> torch.Tensor:
        """The additive mask with keys at distance >= window hidden (sliding-window layers)."""
        if self.window is None:
            return mask
        keys = torch.arange(total, dtype=torch.int64)  # key j sits at position j
        distance = position_ids[:, None, :, None] - keys  # (B, 1, T, S)
        return torch.where(distance >= self.window, torch.full_like(mask, torch.finfo(mask.dtype).min), mask)

    def forward(self, hidden, position_ids, attention_mask, past_key, past_value):  # noqa: ANN001
        layout, layer = self.layout, self.layer
        attn = layer.self_attn
        x = getattr(layer, layout.input_norm)(hidden)
        q, k, v = self._qkv(x)
        q, k, v = (split_heads(t, self.head_dim) for t in (q, k, v))  # (B, N, T, D)
        if layout.qk_norm is not None:
            q = getattr(attn, layout.qk_norm[0])(q)
            k = getattr(attn, layout.qk_norm[1])(k)
        cos, sin = self.rotary(x, position_ids)  # (B, T, R) each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = torch.cat([past_key, k], dim=2)  # (B, Nkv, P+T, D)
        v = torch.cat([past_value, v], dim=2)
        mask = self._mask(attention_mask, position_ids, k.shape[2])
        out = getattr(attn, layout.o_proj)(merge_heads(attend(q, k, v, mask, self.scale, self.softcap)))
        post = _part(layer, layout.attn_out_norm)
        if post is not None:
            out = post(out)
        hidden = hidden + out
        out = layer.mlp(getattr(layer, layout.mlp_in_norm)(hidden))
        post = _part(layer, layout.mlp_out_norm)
        if post is not None:
            out = post(out)
        return hidden + out, k, v


class DecoderHead(nn.Module):
    """Final norm and LM head (final logit softcapping where the config has it)."""

    def __init__(self, model: nn.Module, last_only: bool) -> None:
        super().__init__()
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.last_only = last_only
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.last_only:
            hidden = hidden[:, -1:, :]
        logits = tied_linear(self.norm(hidden), self.lm_head.weight, self.lm_head.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def decoder_shapes(cfg: Any) -> Shapes:
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


def eager_reference(config: Any) -> nn.Module:
    """A random-weight transformers model for ``config`` with the eager attention path."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def layer_types_window(config: Any, index: int) -> int | None:
    """Sliding window from ``config.layer_types`` (Qwen2/3, Gemma 3 in transformers >= 4.53)."""
    types = getattr(config, "layer_types", None)
    if types and types[index] == "sliding_attention":
        return int(config.sliding_window)
    return None


def config_window(config: Any, index: int) -> int | None:
    """One sliding window on every layer, from ``config.sliding_window`` (Mistral, Phi-3), or None."""
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def decoder_spec(family: str, model_types: tuple[str, ...], gguf_archs: tuple[str, ...], layout: DecoderLayout,
                 tiny_config: Callable[[int, int], Any], *, fused: bool = True, notes: str = "",
                 reference: Callable[[Any], Any] = eager_reference) -> ArchSpec:
    """The ArchSpec of a Llama-shaped family: generic modules read through ``layout``."""
    return ArchSpec(
        family=family, model_types=model_types, gguf_archs=gguf_archs, shapes=decoder_shapes,
        embed=DecoderEmbed, layer=lambda model, index: DecoderLayer(model, index, layout), head=DecoderHead,
        embed_uses_positions=False, layer_uses_positions=True, tiny_config=tiny_config, reference=reference,
        layout=layout, fused=fused, notes=notes,
    )
