"""Activation statistics for weight quantisation, from text the model writes itself.

Why: re-quantising weights to 4 bits moves each output by A @ dW. Two cheap things cut that
error without any extra node at run time, if the activations A are known: weight the per-block
rounding search by how large each input channel typically is (E[A_k^2]: a channel that carries
big activations deserves the finer grid), and add the mean error -E[A] @ dW back as
MatMulNBits' bias. The statistics come from ``tokens`` tokens the fp32 model samples from its
own distribution (seeded, from the BOS token), so they need no tokenizer and no corpus, and none
of the benchmark texts is seen at export.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

CALIBRATION_TOKENS = 256
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class InputStats:
    """Per input channel (K,): the mean and the mean square of a linear's input."""

    mean: np.ndarray
    mean_square: np.ndarray


def weight_key(w_kn: np.ndarray) -> str:
    """A content key for a (K, N) weight, as the fused-layer builder concatenates it."""
    return hashlib.sha1(np.ascontiguousarray(w_kn, dtype=np.float32).tobytes()).hexdigest()


def _kn(linear: Any) -> np.ndarray:
    return np.ascontiguousarray(linear.weight.detach().float().numpy().T)


def layer_input_stats(model: Any, tokens: int = CALIBRATION_TOKENS, seed: int = CALIBRATION_SEED) -> dict[str, InputStats]:
    """Input statistics of every Llama-layer linear group and of the head, keyed by :func:`weight_key`.

    Groups as the fused layers build them: q/k/v (or a packed qkv), o, gate/up (or a packed
    gate_up; one input each), down. A group whose key the builder does not meet is simply unused.
    """
    import torch

    layers = model.model.layers
    sums: dict[int, list[Any]] = {}

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])
        entry = sums.setdefault(id(module), [0.0, 0.0, 0])
        entry[0] = entry[0] + x.sum(0)
        entry[1] = entry[1] + (x * x).sum(0)
        entry[2] += x.shape[0]

    def group(parent: Any, packed: str, parts: tuple[str, ...]) -> list[Any]:
        """One packed projection (phi3's qkv_proj, gate_up_proj) or its parts, in the fused order."""
        return [getattr(parent, packed)] if hasattr(parent, packed) else [getattr(parent, p) for p in parts]

    groups = [group(layer.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")) for layer in layers]
    groups += [[layer.self_attn.o_proj] for layer in layers]
    groups += [group(layer.mlp, "gate_up_proj", ("gate_proj", "up_proj")) for layer in layers]
    groups += [[layer.mlp.down_proj] for layer in layers]
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(head, "weight", None) is not None:
        groups.append([head])  # the head's input (the final norm's output), for 4-bit heads
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ids = torch.tensor([[bos]])
        past = None
        out_ids = [bos]
        for _ in range(tokens - 1):  # sample the calibration text, temperature 1
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[0, -1].double(), dim=-1)
            ids = torch.multinomial(probs, 1, generator=generator)[None, :].reshape(1, 1)
            out_ids.append(int(ids))
        handles = [group[0].register_forward_pre_hook(hook) for group in groups]
        try:
            model(input_ids=torch.tensor([out_ids]), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    stats = {}
    for group in groups:
        total, squares, count = sums[id(group[0])]
        w = np.concatenate([_kn(m) for m in group], axis=1)
        stats[weight_key(w)] = InputStats((total / count).numpy().astype(np.float64),
                                          (squares / count).numpy().astype(np.float64))
    return stats
