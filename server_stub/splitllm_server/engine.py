"""The server's math: composed range sessions, run off the event loop, one at a time.

ONNX Runtime already uses every core inside one run, so runs are serialised through a single
worker thread; the event loop stays free for other connections while a run computes. Composed
sessions are kept in a small LRU keyed by (start, end, last_logits_only).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from splitllm.bundle import DEFAULT_VARIANT, Bundle
from splitllm.runtime import KVCache, RuntimeOptions, Segment


@dataclass(frozen=True)
class RunTiming:
    queue_ms: float
    compute_ms: float


class Engine:
    def __init__(self, bundle: Bundle, *, cache_size: int, options: RuntimeOptions, variant: str = DEFAULT_VARIANT) -> None:
        self.bundle = bundle
        self.variant = bundle.check_variant(variant)
        self.options = options
        self.cache_size = cache_size
        self._segments: OrderedDict[tuple[int, int, bool], Segment] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitllm-ort")
        self.compute_seconds = 0.0
        self.runs = 0
        self.unit_seconds = np.zeros(bundle.num_units, dtype=np.float64)
        self._recent: deque[tuple[float, float]] = deque(maxlen=4096)  # (finished at, seconds)

    def segment(self, start: int, end: int, last_logits_only: bool) -> Segment:
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
            while len(self._segments) > self.cache_size:
                self._segments.popitem(last=False)
        return seg

    def _run(self, start: int, end: int, last_only: bool, x: np.ndarray, cache: KVCache, past_len: int,
             enqueued: float) -> tuple[np.ndarray, RunTiming]:
        seg = self.segment(start, end, last_only)  # building a session is not compute: not timed
        began = time.perf_counter()
        out = seg.run(x, cache, past_len)
        done = time.perf_counter()
        seconds = done - began
        self.compute_seconds += seconds
        self.runs += 1
        self._recent.append((done, seconds))
        # Attribute compute to units by their share of the range (for /metrics and the planner).
        self.unit_seconds[start:end] += seconds / (end - start)
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
        await loop.run_in_executor(self._executor, self.segment, start, end, last_only)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._segments.clear()
