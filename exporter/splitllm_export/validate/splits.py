"""Export-time validation: every split, run through ONNX Runtime, must match transformers.

For each split k the prefix (units [0, k+1)) and the suffix (units [k+1, L+2)) run as two
separate sessions with their own KV caches, exactly as a device and a server would: a prompt
prefill, then ``steps`` greedy decode steps through the caches. The greedy tokens must equal
those of the transformers model, and the largest logit difference is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from splitllm.errors import ValidationFailed
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment

# Enough threads for speed, no spinning: two sessions alternate in one process here.
_OPTIONS = RuntimeOptions(allow_spinning=False)


@dataclass(frozen=True)
class Reference:
    prompt_ids: list[int]
    tokens: list[int]  # greedy tokens: one after the prompt, then one per decode step
    logits: list[np.ndarray]  # (V,) for each of those positions


def reference_run(model, prompt_ids: list[int], steps: int) -> Reference:  # noqa: ANN001
    """Greedy decoding with the transformers model and its own KV cache."""
    import torch

    tokens: list[int] = []
    logits: list[np.ndarray] = []
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for step in range(steps + 1):
            last = out.logits[0, -1].float().numpy().copy()
            logits.append(last)
            tokens.append(int(last.argmax()))
            if step < steps:
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return Reference(list(prompt_ids), tokens, logits)


def run_split(bundle: Bundle, split: int, prompt_ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding through prefix k and suffix k, each with its own cache."""
    prefix = Segment(bundle, *bundle.split_range(split, "client"), options=_OPTIONS)
    suffix = Segment(bundle, *bundle.split_range(split, "server"), last_logits_only=True, options=_OPTIONS)
    client_kv, server_kv = KVCache(bundle.shapes), KVCache(bundle.shapes)
    x = np.asarray([prompt_ids], dtype=np.int64)
    past = 0
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    for _ in range(steps + 1):
        hidden = prefix.run(x, client_kv, past)
        out = suffix.run(hidden, server_kv, past)[0, -1]
        past += x.shape[1]
        logits.append(out)
        tokens.append(int(out.argmax()))
        x = np.asarray([[tokens[-1]]], dtype=np.int64)
    return tokens, logits


def validate_splits(
    bundle: Bundle,
    reference: Reference,
    splits: Iterable[int],
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, object]]:
    """Check each split; raise ValidationFailed naming the first split that differs."""
    results: list[dict[str, object]] = []
    steps = len(reference.tokens) - 1
    for split in splits:
        tokens, logits = run_split(bundle, split, reference.prompt_ids, steps)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(logits, reference.logits, strict=True))
        match = tokens == reference.tokens
        results.append({"split": split, "max_abs_diff": diff, "tokens_match": match})
        if not match:
            raise ValidationFailed(
                f"split {split}: greedy tokens {tokens} differ from transformers {reference.tokens} "
                f"(max logit difference {diff:.3g})"
            )
        if progress:
            progress(split)
    return results
