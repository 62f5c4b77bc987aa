"""How long each unit takes on this machine: the planner's c_i (device) and s_i (server).

Each unit runs alone in its own ORT session with the settings generation uses, for a prefill
of ``prefill_tokens`` positions and for one decode step after ``context`` cached positions; the
median of ``repeats`` runs is kept. Summing per-unit times slightly overestimates a fused range
(one session per range saves a little per-call overhead), which errs on the safe side of an SLA.
Profiles are cached per bundle and thread count, so a device measures once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitllm.errors import ConfigError
from splitllm.model.bundle import DEFAULT_VARIANT, Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment

__all__ = ["Profile", "default_cache_dir", "load_or_measure", "measure"]


@dataclass(frozen=True)
class Profile:
    """Per-unit milliseconds (unit 0 = embeddings, 1..L layers, L+1 head)."""

    bundle_id: str
    threads: int
    prefill_tokens: int
    context: int
    prefill_ms: tuple[float, ...]
    decode_ms: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, num_units: int | None = None) -> Profile:
        if not isinstance(data, dict):
            raise ConfigError("a profile must be a JSON object")
        try:
            profile = cls(
                bundle_id=str(data.get("bundle_id", "")),
                threads=int(data.get("threads", 0)),
                prefill_tokens=int(data["prefill_tokens"]),
                context=int(data.get("context", 0)),
                prefill_ms=tuple(float(x) for x in data["prefill_ms"]),
                decode_ms=tuple(float(x) for x in data["decode_ms"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"profile is missing or has a bad field: {exc!r}") from exc
        for name in ("prefill_ms", "decode_ms"):
            values = getattr(profile, name)
            if num_units is not None and len(values) != num_units:
                raise ConfigError(f"profile.{name} has {len(values)} entries; the model has {num_units} units")
            if not all(np.isfinite(v) and v >= 0 for v in values):
                raise ConfigError(f"profile.{name} must hold finite numbers >= 0")
        if profile.prefill_tokens < 1:
            raise ConfigError(f"profile.prefill_tokens must be >= 1, got {profile.prefill_tokens}")
        return profile

    def scaled_prefill_ms(self, tokens: int) -> tuple[float, ...]:
        """Prefill time for ``tokens`` positions, assuming time linear in the positions."""
        factor = tokens / self.prefill_tokens
        return tuple(ms * factor for ms in self.prefill_ms)


def _median_ms(seg: Segment, x: np.ndarray, cache_factory, past: int, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats + 1):  # the first run warms the session up
        cache = cache_factory()
        started = time.perf_counter()
        seg.run(x, cache, past)
        times.append((time.perf_counter() - started) * 1e3)
    return float(np.median(times[1:]))


def measure(
    bundle: Bundle,
    *,
    prefill_tokens: int = 64,
    context: int = 128,
    repeats: int = 5,
    options: RuntimeOptions | None = None,
    progress=None,  # noqa: ANN001 - optional callable(unit)
    variant: str = DEFAULT_VARIANT,
) -> Profile:
    """Time every unit of ``bundle`` here, with the ``variant`` weights generation will use."""
    if prefill_tokens < 1 or context < 0 or repeats < 1:
        raise ConfigError("prefill_tokens and repeats must be >= 1 and context >= 0")
    options = options or RuntimeOptions()
    shapes = bundle.shapes
    rng = np.random.default_rng(0)
    prefill, decode = [], []
    for unit in range(bundle.num_units):
        seg = Segment(bundle, unit, unit + 1, last_logits_only=True, options=options, variant=variant)
        x_prefill: np.ndarray
        x_decode: np.ndarray
        if unit == 0:
            x_prefill = rng.integers(0, shapes.vocab_size, (1, prefill_tokens), dtype=np.int64)
            x_decode = x_prefill[:, :1]
        else:
            x_prefill = rng.standard_normal((1, prefill_tokens, shapes.hidden_size), dtype=np.float32)
            x_decode = x_prefill[:, :1]

        def full_cache(unit: int = unit) -> KVCache:
            cache = KVCache(shapes)
            if 1 <= unit <= shapes.num_layers:
                kv = np.zeros((1, shapes.num_kv_heads, context, shapes.head_dim), dtype=np.float32)
                cache.set(unit, kv, kv)
            return cache

        prefill.append(_median_ms(seg, x_prefill, lambda: KVCache(shapes), 0, repeats))
        decode.append(_median_ms(seg, x_decode, full_cache, context, repeats))
        del seg
        if progress:
            progress(unit)
    return Profile(bundle.bundle_id, options.intra_op_threads, prefill_tokens, context, tuple(prefill), tuple(decode))


def default_cache_dir() -> Path:
    root = os.environ.get("SPLITLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "splitllm")
    return Path(root)


def load_or_measure(bundle: Bundle, *, threads: int = 0, cache_dir: Path | None = None, refresh: bool = False,
                    variant: str = DEFAULT_VARIANT, **kwargs: Any) -> Profile:
    """The cached profile for this bundle, weights variant and thread count, measured (and cached) if missing."""
    weights = "" if variant == DEFAULT_VARIANT else f"-{variant}"
    path = (cache_dir or default_cache_dir()) / f"profile-{bundle.bundle_id[:16]}{weights}-t{threads}.json"
    if path.is_file() and not refresh:
        try:
            return Profile.from_dict(json.loads(path.read_text()), bundle.num_units)
        except (OSError, ValueError, ConfigError):
            pass  # unreadable cache: measure again
    profile = measure(bundle, options=RuntimeOptions(intra_op_threads=threads, allow_spinning=False), variant=variant,
                      **kwargs)
    save_cached(path, profile.to_dict())
    return profile


def save_cached(path: Path, data: dict[str, Any]) -> None:
    """Write a measurement to the cache atomically; a read-only cache only costs measuring again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass
