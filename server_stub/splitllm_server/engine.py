"""The server's math: composed range sessions, run off the event loop, one at a time.

ONNX Runtime already uses every core inside one run, so runs are serialised through a single
worker thread; the event loop stays free for other connections while a run computes.

Ranges are built from aligned pieces. Every ORT session prepacks its own copy of its MatMul
weights, so four clients at four different splits used to cost four copies of the model's tail
(SmolLM2 suffixes from units 21, 11, 6 and 1: +1.6 GB). A range ``[start, end)`` is therefore cut
at multiples of ``chunk_units`` and run as that chain of sessions, which clients at other splits
share: only the unaligned first piece is specific to a split. Chaining costs one ORT run per
piece, a few percent of a step at most (``benchmarks/server_memory.py``: 0.43x the memory at
0.96-1.16x the step time); ``chunk_units=0`` keeps one session per range. Pieces live in an
LRU keyed by (start, end, last_logits_only).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from splitllm.errors import ConfigError
from splitllm.model.bundle import DEFAULT_VARIANT, Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment
from splitllm_server.config import DEFAULT_CHUNK_UNITS


@dataclass(frozen=True)
class RunTiming:
    queue_ms: float
    compute_ms: float


class Engine:
    def __init__(self, bundle: Bundle, *, cache_size: int, options: RuntimeOptions, variant: str = DEFAULT_VARIANT,
                 chunk_units: int = DEFAULT_CHUNK_UNITS) -> None:
        if chunk_units < 0:
            raise ConfigError(f"chunk_units must be >= 0, got {chunk_units}")
        self.bundle = bundle
        self.variant = bundle.check_variant(variant)
        self.options = options
        self.chunk_units = chunk_units
        self.cache_size = cache_size
        # cache_size ranges' worth of pieces: a range has at most ceil(units / chunk) + 1 of them.
        per_range = 1 if chunk_units == 0 else -(-bundle.num_units // chunk_units) + 1
        self.max_pieces = cache_size * per_range
        self._segments: OrderedDict[tuple[int, int, bool], Segment] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitllm-ort")
        self.compute_seconds = 0.0
        self.runs = 0
        self.unit_seconds = np.zeros(bundle.num_units, dtype=np.float64)
        self._recent: deque[tuple[float, float]] = deque(maxlen=4096)  # (finished at, seconds)

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """``[start, end)`` cut at the multiples of ``chunk_units`` inside it (whole with 0)."""
        if self.chunk_units == 0:
            return [(start, end)]
        step = self.chunk_units
        cuts = [start, *range((start // step + 1) * step, end, step), end]
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def segments(self, start: int, end: int, last_logits_only: bool) -> list[Segment]:
        """The sessions that run ``[start, end)`` in order, loaded (or taken from the LRU)."""
        return [self._piece(a, b, last_logits_only and b == self.bundle.num_units) for a, b in self.pieces(start, end)]

    def _piece(self, start: int, end: int, last_logits_only: bool) -> Segment:
        key = (start, end, last_logits_only)
        with self._lock:
            seg = self._segments.get(key)
            if seg is not None:
                self._segments.move_to_end(key)
                return seg
        seg = Segment(self.bundle, start, end, last_logits_only=last_logits_only, options=self.options,
                      variant=self.variant)
        with self._lock:
            self._segments[key] = seg
            while len(self._segments) > self.max_pieces:
                self._segments.popitem(last=False)
        return seg

    def _run(self, start: int, end: int, last_only: bool, x: np.ndarray, cache: KVCache, past_len: int,
             enqueued: float) -> tuple[np.ndarray, RunTiming]:
        segs = self.segments(start, end, last_only)  # building sessions is not compute: not timed
        began = time.perf_counter()
        out = x
        for seg in segs:
            piece_began = time.perf_counter()
            out = seg.run(out, cache, past_len)
            # Attribute compute to units by their share of the piece (for /metrics and the planner).
            self.unit_seconds[seg.start:seg.end] += (time.perf_counter() - piece_began) / (seg.end - seg.start)
        done = time.perf_counter()
        seconds = done - began
        self.compute_seconds += seconds
        self.runs += 1
        self._recent.append((done, seconds))
        return out, RunTiming(queue_ms=(began - enqueued) * 1e3, compute_ms=seconds * 1e3)

    async def run(self, start: int, end: int, last_only: bool, x: np.ndarray, cache: KVCache,
                  past_len: int) -> tuple[np.ndarray, RunTiming]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._run, start, end, last_only, x, cache, past_len, time.perf_counter()
        )

    def utilisation(self, window_s: float = 10.0) -> float:
        """Fraction of the last ``window_s`` seconds the ORT worker spent computing."""
        cutoff = time.perf_counter() - window_s
        busy = sum(seconds for finished, seconds in list(self._recent) if finished >= cutoff)
        return min(busy / window_s, 1.0)

    def load_factor(self) -> float:
        """How much longer a run takes end to end on this server now: 1 / (1 - utilisation), the
        M/M/1 stretch of response time, capped at 10 (utilisation counted up to 0.9)."""
        return 1.0 / (1.0 - min(self.utilisation(), 0.9))

    async def call(self, fn, *args):  # noqa: ANN001, ANN201
        """Run ``fn`` on the ORT worker thread (after the runs already queued)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def warm_up(self, start: int, end: int, last_only: bool) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.segments, start, end, last_only)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._segments.clear()
