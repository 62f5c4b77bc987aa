"""Server pieces: ORT sessions for aligned unit ranges, and one run of a piece over a batch of rows.

Ranges are built from aligned pieces. Every ORT session prepacks its own copy of its MatMul
weights, so four clients at four different splits would cost four copies of the model's tail. A
range ``[start, end)`` is therefore cut at multiples of ``chunk_units`` (``scheduler.cut``) and
run as that chain of sessions, which clients at other splits share: only the unaligned first piece is specific to a
split (``benchmarks/server_memory.py``); ``chunk_units=0`` keeps one session per range.

A piece over fused layers runs a *batch*: rows ``lo..hi`` of the KV pools (``kvpool``) bound as
past and present of every layer, one input row per slot, ``seqlens_k`` per row. Rows without a
step in the batch are idle rows (see ``kvpool``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from splitllm.errors import RuntimeFailure
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import RuntimeOptions, Segment
from splitllm_server.kvpool import KVPool

__all__ = ["BatchRow", "Piece", "PieceCache"]


@dataclass
class BatchRow:
    """One session's step in a batched piece run: its slot, its input (T positions) and past length."""

    slot: int
    x: np.ndarray  # (T,) int64 ids for a piece from unit 0, else (T, H) float32
    past_len: int


class Piece:
    """Units [start, end) of the server's weights as one ORT session.

    ``pooled`` pieces (fused layers) run batches over KV pool rows with :meth:`run_rows`; others
    (exported layer graphs) run one session at a time through a :class:`Segment` and its cache.
    """

    def __init__(self, bundle: Bundle, start: int, end: int, last_only: bool, options: RuntimeOptions,
                 variant: str) -> None:
        self.bundle = bundle
        self.start, self.end = start, end
        self.segment = Segment(bundle, start, end, last_logits_only=last_only, options=options, variant=variant)
        self.session: ort.InferenceSession = self.segment.session
        self.layer_units = self.segment.layer_units
        self.takes_ids = self.segment.takes_ids
        self.pooled = "seqlens_k" in self.segment.input_names or not self.layer_units
        self._io: ort.IOBinding | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.start, self.end)

    def run_rows(self, pool: KVPool, rows: list[BatchRow], lo: int, hi: int) -> np.ndarray:
        """Run every row's T new positions; slots ``lo..hi`` not in ``rows`` are idle rows.

        Returns the outputs of the rows in ``rows`` order: hidden (len(rows), T, H) or the head's
        logits (len(rows), T', V). Each real row's layers must hold exactly ``past_len`` positions;
        their lengths grow by T. Raises RuntimeFailure (and changes no length) if ORT fails.
        """
        seg = self.segment
        n_tokens = int(rows[0].x.shape[0])
        span = hi - lo + 1
        if self.takes_ids:
            x = np.zeros((span, n_tokens), dtype=np.int64)
        else:
            x = np.zeros((span, n_tokens, self.bundle.shapes.hidden_size), dtype=np.float32)
        units = self.layer_units
        lengths = pool.lengths[lo:hi + 1]
        # Idle rows write one position past everything they hold in this piece's layers.
        past = lengths[:, units].max(axis=1) if units else np.zeros(span, dtype=np.int64)
        for row in rows:
            x[row.slot - lo] = row.x
            past[row.slot - lo] = row.past_len
        feeds: dict[str, np.ndarray] = {seg.main_input: x}
        if "seqlens_k" in seg.input_names:
            feeds["seqlens_k"] = (past + n_tokens - 1).astype(np.int32)
            feeds["total_seq_len"] = np.array(int(past.max()) + n_tokens, dtype=np.int32)
        if "position_ids" in seg.input_names:  # a piece without layers (embeddings, head)
            feeds["position_ids"] = (past[:, None] + np.arange(n_tokens)[None, :]).astype(np.int64)
        if self._io is None:
            self._io = self.session.io_binding()
        io = self._io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_output(seg.main_output, "cpu")  # bound first: get_outputs()[0]; shape set by the run
        for unit in units:
            key, value = pool.pool(unit)
            for name, buf in (("key", key), ("value", value)):
                view = ort.OrtValue.ortvalue_from_numpy(buf[lo:hi + 1])
                io.bind_ortvalue_input(f"past_{name}.{unit - 1}", view)
                io.bind_ortvalue_output(f"present_{name}.{unit - 1}", view)
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)  # no copy: ``feeds`` keeps the arrays alive for the run
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:  # onnxruntime's own exception types
            raise RuntimeFailure(f"running units [{self.start}, {self.end}) failed: {exc}") from exc
        out = io.get_outputs()[0].numpy()
        for row in rows:
            lengths[row.slot - lo, units] = row.past_len + n_tokens
        return out[[row.slot - lo for row in rows]]


class PieceCache:
    """An LRU of loaded pieces, keyed by (start, end, last_only).

    :meth:`get` builds a missing piece where it is called. The executor instead asks :meth:`ready`,
    which starts a missing piece's build on a loader thread and answers False until it is done:
    building an ORT session takes about 100 ms for a few of SmolLM2's layers, and the steps of
    every other session would wait that long behind it on the engine thread.
    """

    def __init__(self, bundle: Bundle, options: RuntimeOptions, variant: str, max_pieces: int) -> None:
        self.bundle = bundle
        self.options = options
        self.variant = variant
        self.max_pieces = max_pieces
        self._pieces: OrderedDict[tuple[int, int, bool], Piece] = OrderedDict()
        self._building: dict[tuple[int, int, bool], Future[Piece]] = {}
        self._loader: ThreadPoolExecutor | None = None

    def key(self, start: int, end: int, last_only: bool | None = None) -> tuple[int, int, bool]:
        """The cache key of [start, end); only a head piece has a ``last_only`` of True."""
        last_only = end == self.bundle.num_units if last_only is None else last_only and end == self.bundle.num_units
        return (start, end, last_only)

    def get(self, start: int, end: int, last_only: bool | None = None) -> Piece:
        """The piece for [start, end), built now if missing; a head piece keeps only the last
        position's logits unless ``last_only`` is False."""
        key = self.key(start, end, last_only)
        if key in self._building:  # a build under way: take its result
            self.ready(key, wait=True)
        piece = self._pieces.get(key)
        if piece is not None:
            self._pieces.move_to_end(key)
            return piece
        return self._insert(key, self._build(key))

    def ready(self, key: tuple[int, int, bool], *, wait: bool = False,
              on_built: Callable[[], None] | None = None) -> bool:
        """True if the piece for ``key`` is loaded; if not, start building it in the background
        (``on_built`` is called from the loader thread when it is done) and return False.
        Raises whatever the build raised (ORT's errors or ours), once, to the caller that finds
        it failed; nothing is cached for that key."""
        if key in self._pieces:
            return True
        future = self._building.get(key)
        if future is None:
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitllm-piece-loader")
            future = self._building[key] = self._loader.submit(self._build, key)
            if on_built is not None:
                future.add_done_callback(lambda _f: on_built())
        if not (wait or future.done()):
            return False
        del self._building[key]
        self._insert(key, future.result())
        return True

    def _build(self, key: tuple[int, int, bool]) -> Piece:
        return Piece(self.bundle, key[0], key[1], key[2], self.options, self.variant)

    def _insert(self, key: tuple[int, int, bool], piece: Piece) -> Piece:
        self._pieces[key] = piece
        while len(self._pieces) > self.max_pieces:
            self._pieces.popitem(last=False)
        return piece

    def __len__(self) -> int:
        return len(self._pieces)

    def loaded(self) -> list[Piece]:
        """The pieces loaded now (a snapshot, safe to read from another thread)."""
        return list(self._pieces.values())

    def clear(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
            self._loader = None
        self._building.clear()
        self._pieces.clear()
