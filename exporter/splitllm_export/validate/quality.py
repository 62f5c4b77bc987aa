"""Teacher-forced quality of a weight variant: top-1 agreement and perplexity against fp32.

Why teacher-forced: free-running greedy agreement on a few prompts is noisy (one early flip
changes every later token). Here every position sees the true text, so each next-token
prediction is compared on its own. Text: Python's ``pydoc_data.topics`` values in sorted key
order (real English prose with code, offline and deterministic), tokenised by the bundle.
Used at export (one window, into the manifest) and by benchmarks/weights_quality.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from splitllm.errors import ConfigError
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment

QUALITY_TEXT = "pydoc_data.topics values in sorted key order, joined by blank lines"


def quality_tokens(bundle: Bundle, n_tokens: int) -> np.ndarray:
    """The first ``n_tokens`` ids (N,) int64 of real English text (ConfigError if it is shorter)."""
    from pydoc_data.topics import topics

    ids = bundle.text.encode("\n\n".join(topics[key] for key in sorted(topics)))
    if len(ids) < n_tokens:
        raise ConfigError(f"the pydoc text has only {len(ids)} tokens, asked for {n_tokens}")
    return np.asarray(ids[:n_tokens], dtype=np.int64)


def next_token_stats(bundle: Bundle, variant: str, ids: np.ndarray, window: int,
                     options: RuntimeOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced predictions through the whole model in ``variant``.

    The text is cut into windows of ``window`` tokens, each run in one pass from an empty cache.
    Returns, for every position that has a next token inside its window, the argmax token and
    the log-probability of the true next token (two (M,) arrays).
    """
    window = min(window, bundle.shapes.max_context)
    segment = Segment(bundle, 0, bundle.num_units, last_logits_only=False, options=options, variant=variant)
    top, logp = [], []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = segment.run(chunk[None, :], KVCache(bundle.shapes), 0)[0, :-1]  # (W-1, V)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=-1))
        top.append(logits.argmax(axis=-1))
        logp.append(shifted[np.arange(len(chunk) - 1), chunk[1:]] - log_z)
    return np.concatenate(top), np.concatenate(logp)


def compare_quality(reference: tuple[np.ndarray, np.ndarray], variant: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Top-1 agreement with the reference's argmax and the perplexity change, as manifest fields."""
    ppl_ref = float(np.exp(-reference[1].astype(np.float64).mean()))
    ppl = float(np.exp(-variant[1].astype(np.float64).mean()))
    return {
        "predictions": int(len(reference[0])),
        "top1_agreement": round(float((reference[0] == variant[0]).mean()), 5),
        "ppl_fp32": round(ppl_ref, 4),
        "ppl": round(ppl, 4),
        "ppl_delta_pct": round((ppl / ppl_ref - 1) * 100, 3),
    }
