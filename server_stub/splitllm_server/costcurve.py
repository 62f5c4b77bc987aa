"""What one more client costs the server: decode step time per unit as a function of batch rows.

A batched piece costs far less than its rows run one by one: at small batches a decode step is
bound by reading the weights, which every row shares, so adding a row adds little; at large
batches the matrix products dominate and each row adds about the same. The planner should
therefore price a server layer at the *marginal* cost of one more row at the current occupancy,
not at its batch-1 time times a load factor.

The curve is measured once per (bundle, weights, threads) on the engine thread, with a scratch
KV pool (no session's KV is touched): one decoder layer, the embeddings and the head, each alone
as a piece, at batch sizes 1, 2, 4, ... up to the engine's ``max_batch``, every row after
``context`` cached positions. Decoder layers of a model share one curve (they have the same
shapes), so identical layers get identical prices. Cached next to the unit profiles.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitllm.errors import ConfigError
from splitllm.model.bundle import Bundle
from splitllm.planner.profile import default_cache_dir, save_cached
from splitllm_server.kvpool import KVPool
from splitllm_server.pieces import BatchRow, Piece

__all__ = ["BatchCurve", "load_or_measure_curve", "measure_curve"]

_CONTEXT = 64  # cached positions behind every row while timing
_LAYER_SPAN = 8  # layers timed together, per-layer time = run time / span
_REPEATS = 5


@dataclass(frozen=True)
class BatchCurve:
    """Median milliseconds of one decode step of a unit kind at each measured batch size."""

    bundle_id: str
    variant: str
    threads: int
    batches: tuple[int, ...]
    embed_ms: tuple[float, ...]
    layer_ms: tuple[float, ...]
    head_ms: tuple[float, ...]

    def _kind(self, unit: int, num_units: int) -> tuple[float, ...]:
        if unit == 0:
            return self.embed_ms
        return self.head_ms if unit == num_units - 1 else self.layer_ms

    def step_ms(self, unit: int, num_units: int, rows: float) -> float:
        """Time of a decode step of ``unit`` with ``rows`` rows (linear between measured sizes,
        extrapolated along the last segment beyond them)."""
        values = self._kind(unit, num_units)
        xs = self.batches
        if rows <= xs[0]:
            return values[0]
        for i in range(1, len(xs)):
            if rows <= xs[i] or i == len(xs) - 1:
                slope = (values[i] - values[i - 1]) / (xs[i] - xs[i - 1])
                return values[i - 1] + slope * (rows - xs[i - 1])
        return values[-1]  # unreachable: the loop returns at its last segment

    def marginal_ms(self, unit: int, num_units: int, occupancy: float) -> float:
        """What one more row adds to a step of ``unit`` that already has ``occupancy`` rows."""
        if occupancy <= 0:
            return self.step_ms(unit, num_units, 1)
        return max(self.step_ms(unit, num_units, occupancy + 1) - self.step_ms(unit, num_units, occupancy), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time_piece(piece: Piece, pool: KVPool, batch: int) -> float:
    rows_in = [BatchRow(slot, np.zeros(1, dtype=np.int64) if piece.takes_ids else
                        np.zeros((1, piece.bundle.shapes.hidden_size), dtype=np.float32), _CONTEXT)
               for slot in range(batch)]
    times = []
    for _ in range(_REPEATS):
        pool.lengths[:batch, :] = _CONTEXT
        began = time.perf_counter()
        piece.run_rows(pool, rows_in, 0, batch - 1)
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def measure_curve(bundle: Bundle, variant: str, threads: int, max_batch: int, options: Any) -> BatchCurve:
    """Time the three unit kinds at batch sizes 1, 2, 4, ... <= ``max_batch`` (blocks for ~seconds)."""
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    batches = [1]
    while batches[-1] * 2 <= max_batch:
        batches.append(batches[-1] * 2)
    if batches[-1] != max_batch:
        batches.append(max_batch)
    pool = KVPool(bundle.shapes, max_batch, _CONTEXT + 1)
    last = bundle.num_units - 1
    # A layer is timed inside a run of several: one layer run again and again keeps its weights
    # in the CPU's last-level cache, which a model step never does (its layers stream from
    # memory). On SmolLM2, one thread of a 2-core AMD EPYC, one layer alone: 0.50 ms at batch
    # 1, against ~0.8 ms per layer in the server's steps (docs/planner.md).
    span = min(_LAYER_SPAN, bundle.num_layers)
    kinds = {}
    for name, start, end in (("embed", 0, 1), ("layer", 1, 1 + span), ("head", last, last + 1)):
        piece = Piece(bundle, start, end, end == last + 1, options, variant)
        _time_piece(piece, pool, 1)  # warm-up: the first run allocates
        kinds[name] = tuple(round(_time_piece(piece, pool, b) / (end - start), 4) for b in batches)
    return BatchCurve(bundle.bundle_id, variant, threads, tuple(batches), kinds["embed"], kinds["layer"], kinds["head"])


def _cache_path(bundle: Bundle, variant: str, threads: int, max_batch: int) -> Path:
    # "v2": layers timed in a run of several (curves timed one layer alone are not reused)
    return default_cache_dir() / f"batchcurve-v2-{bundle.bundle_id[:16]}-{variant}-t{threads}-b{max_batch}.json"


def load_or_measure_curve(bundle: Bundle, variant: str, threads: int, max_batch: int, options: Any) -> BatchCurve:
    """The cached curve for these settings, or a new measurement (then cached)."""
    path = _cache_path(bundle, variant, threads, max_batch)
    try:
        data = json.loads(path.read_text())
        return BatchCurve(str(data["bundle_id"]), str(data["variant"]), int(data["threads"]),
                          tuple(int(b) for b in data["batches"]),
                          *(tuple(float(v) for v in data[k]) for k in ("embed_ms", "layer_ms", "head_ms")))
    except (OSError, ValueError, TypeError, KeyError):
        pass
    curve = measure_curve(bundle, variant, threads, max_batch, options)
    save_cached(path, curve.to_dict())
    return curve
