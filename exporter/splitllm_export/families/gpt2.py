"""GPT-2: learned positions, LayerNorm, packed c_attn (Conv1D), GELU MLP; exported-graph layers only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from splitllm_export.graphs.arch import ArchSpec, Shapes
from splitllm_export.graphs.layers import attend, eager_reference, merge_heads, split_heads, tied_linear


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
        q, k, v = (split_heads(t, self.head_dim) for t in (q, k, v))
        k = torch.cat([past_key, k], dim=2)  # (B, N, P+T, D)
        v = torch.cat([past_value, v], dim=2)
        out = attn.c_proj(merge_heads(attend(q, k, v, attention_mask, self.scale)))
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
        return tied_linear(self.ln_f(hidden), self.lm_head.weight, self.lm_head.bias)


def _shapes(cfg: Any) -> Shapes:
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


def tiny_config(vocab_size: int, num_layers: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=num_layers, n_head=4, n_positions=512,
        initializer_range=0.1, bos_token_id=0, eos_token_id=2,
    )


SPEC = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    gguf_archs=("gpt2",),
    shapes=_shapes,
    embed=_GPT2Embed,
    layer=_GPT2Layer,
    head=_GPT2Head,
    embed_uses_positions=True,
    layer_uses_positions=False,
    tiny_config=tiny_config,
    reference=eager_reference,
    notes="exported-graph layers (LayerNorm and GELU have no fused form here)",
)
