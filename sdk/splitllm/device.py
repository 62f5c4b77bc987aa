"""The device's side of the math: composed ORT segments for local ranges, run off the event loop.

A :class:`LocalDevice` keeps the few segments its placements use (an LRU: each holds its layers'
weights) and runs them on one worker thread, so the event loop keeps streaming tokens and
answering pings while ONNX Runtime computes. Emulators subclass it (``splitllm.testing``).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from splitllm.model.bundle import DEFAULT_VARIANT, Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment

__all__ = ["LocalDevice"]


class LocalDevice:
    """Runs ranges of ``bundle`` on this machine with ``variant`` weights.

    ``max_segments`` composed ranges stay loaded, most recently used kept. Segments of the same
    range in one process share their ORT session (``make_session(shared=True)``), so many
    clients in one process (a gateway, a load test) hold the weights once.
    """

    def __init__(self, bundle: Bundle, options: RuntimeOptions, variant: str = DEFAULT_VARIANT,
                 max_segments: int = 4) -> None:
        self.bundle = bundle
        self.options = options
        self.variant = bundle.check_variant(variant)
        self.max_segments = max_segments
        self._segments: dict[tuple[int, int, bool], Segment] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitllm-device")

    def segment(self, start: int, end: int, last_only: bool) -> Segment:
        """The segment for units [start, end) (``last_only``: logits of the last position only)."""
        key = (start, end, last_only)
        seg = self._segments.pop(key, None)
        if seg is None:
            seg = Segment(self.bundle, start, end, last_logits_only=last_only, options=self.options,
                          variant=self.variant)
        self._segments[key] = seg  # most recently used last
        while len(self._segments) > self.max_segments:
            self._segments.pop(next(iter(self._segments)))
        return seg

    def segments(self) -> list[Segment]:
        """The segments loaded now, least recently used first."""
        return list(self._segments.values())

    def run_sync(self, start: int, end: int, x: np.ndarray, cache: KVCache, past_len: int,
                 all_logits: bool = False) -> np.ndarray:
        """Run units [start, end) over ``x`` (ids (1, T) from unit 0, else hidden (1, T, H)); on the
        worker thread. Returns hidden states, or when ``end`` is the head the last position's
        logits (every position's with ``all_logits``)."""
        seg = self.segment(start, end, end == self.bundle.num_units and not all_logits)
        return seg.run(x, cache, past_len)

    async def run(self, start: int, end: int, x: np.ndarray, cache: KVCache, past_len: int,
                  all_logits: bool = False) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.run_sync, start, end, x, cache, past_len, all_logits)

    async def call(self, fn, *args):  # noqa: ANN001, ANN201
        """Run ``fn(*args)`` on the device's worker thread (after runs already queued)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def load(self, start: int, end: int) -> None:
        """Build the segment for [start, end) now, so the first step does not wait for it."""
        await self.call(self.segment, start, end, end == self.bundle.num_units)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
