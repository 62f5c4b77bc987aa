"""Choosing the next token from logits, identically on the device and on the server.

Sampling runs wherever the LM head runs. A seeded sample depends only on (seed, position), so
a replayed or resumed generation draws the same tokens whichever side samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitllm.errors import ConfigError, RuntimeFailure

__all__ = ["SamplingParams", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")


def sample(logits: np.ndarray, params: SamplingParams, position: int) -> int:
    """Pick a token from 1-D logits (V,) for the token at ``position`` of the sequence."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    if not np.isfinite(logits).all():
        raise RuntimeFailure("the model produced non-finite logits; cannot sample")
    if params.temperature == 0:
        return int(np.argmax(logits))
    shifted = logits.astype(np.float64) - float(logits.max())
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # A tiny temperature makes the gaps overflow to -inf: those tokens get probability 0.
        scaled = shifted / params.temperature
    scaled = np.where(np.isnan(scaled), -np.inf, scaled)
    order = np.argsort(-scaled, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    kept = scaled[order]
    probs = np.exp(kept - kept[0])
    probs /= probs.sum()
    if params.top_p < 1:
        cutoff = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        probs = probs[:cutoff] / probs[:cutoff].sum()
        order = order[:cutoff]
    rng = np.random.default_rng([params.seed, position])
    return int(order[rng.choice(len(probs), p=probs)])
