"""The server's executor: pieces, KV stores and the ORT runs the scheduler's steps ask for.

It holds what the scheduler must not: the loaded pieces (``pieces.PieceCache``), every
session's KV store (a row of the ``kvpool`` pools for fused layers, the SDK's ``KVCache`` for
exported layer graphs, both a :class:`~splitllm_server.kvpool.SessionKV`), and each queued job's
arrays: the Run's decoded input, the activations between pieces and the finished chunks. It
decodes payloads (Run, KVPut) and builds the replies (samples the token, encodes the output,
KVData). Every method runs on the engine's thread, so a cache is never read and written at once.

A step's row that fails (bad input, ORT error) fails alone: its error goes into the
:class:`~splitllm_server.scheduler.StepOutput`, the KV lengths of its session are left as they
were, and the batch it was in is retried without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from splitllm import codec as codecs
from splitllm.errors import ContextTooLong, RuntimeFailure, SessionStateError, SplitLLMError, TooManySessions
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions
from splitllm.model.sampling import SamplingParams, sample
from splitllm.protocol import wire
from splitllm.protocol.payload import check_shape, decode_run_input
from splitllm_server.kvpool import KVPool, PooledKV, SessionKV
from splitllm_server.pieces import BatchRow, Piece, PieceCache
from splitllm_server.scheduler import Job, PieceKey, Readiness, RunTiming, Step, StepOutput, StepRow, cut

__all__ = ["Executor"]

log = logging.getLogger("splitllm.server.engine")

_IDLE_GAP_ROWS = 8  # a span is cut where more idle rows than this lie between two real ones


@dataclass
class _Work:
    """A queued job's arrays and the Run it answers."""

    msg: wire.Run
    kv: SessionKV
    x: np.ndarray  # the whole input: (T,) ids or (T, H) hidden
    hidden: np.ndarray | None = None  # the chunk's current activations
    outputs: list[np.ndarray] = field(default_factory=list)  # finished chunks (want != token)


class Executor:
    """Runs steps over the sessions' KV; one per engine. ``max_sessions`` and ``max_context``
    size the KV pools (memory bound in ``kvpool``); ``cache_size`` ranges' pieces stay loaded."""

    def __init__(self, bundle: Bundle, *, cache_size: int, options: RuntimeOptions, variant: str, chunk_units: int,
                 max_sessions: int, max_context: int, on_built: Callable[[], None]) -> None:
        self.bundle = bundle
        self.variant = bundle.check_variant(variant)
        self.options = options
        self.chunk_units = chunk_units
        self.max_context = max_context
        # cache_size ranges' worth of pieces: a range has at most ceil(units / chunk) + 1 of them.
        per_range = 1 if chunk_units == 0 else -(-bundle.num_units // chunk_units) + 1
        self.piece_cache = PieceCache(bundle, options, self.variant, cache_size * per_range)
        # Fused layers batch over pool rows; exported layer graphs keep a cache per session.
        self.pooled = bundle.manifest.get("export", {}).get("layer_graphs") == "fused"
        self.pool = KVPool(bundle.shapes, max_sessions, max_context) if self.pooled else None
        self._free_slots = list(range(max_sessions - 1, -1, -1))  # for caches outside the pool
        self.stores: dict[int, SessionKV] = {}  # slot -> the KV store of the session holding it
        self._caches: dict[int, KVCache] = {}  # the same stores, where they are KVCaches
        self._work: dict[int, _Work] = {}  # job id -> its arrays
        self._on_built = on_built

    # ------------------------------------------------------------------ sessions and their KV

    def open_session(self) -> tuple[int, SessionKV]:
        """A slot and an empty KV store for a new session (TooManySessions when none is free)."""
        kv: SessionKV
        if self.pool is not None:
            slot = self.pool.take()
            kv = PooledKV(self.pool, slot)
        elif self._free_slots:
            slot = self._free_slots.pop()
            kv = self._caches[slot] = KVCache(self.bundle.shapes)
        else:
            raise TooManySessions("the server holds its maximum of sessions; try again later")
        self.stores[slot] = kv
        return slot, kv

    def close_session(self, slot: int) -> bool:
        """Give the slot back; False if no session held it."""
        if self.stores.pop(slot, None) is None:
            return False
        self._caches.pop(slot, None)
        if self.pool is not None:
            self.pool.give_back(slot)
        else:
            self._free_slots.append(slot)
        return True

    def kv_put(self, kv: SessionKV, msg: wire.KVPut) -> None:
        """Take over a layer's KV from the client (the layer moves to the server)."""
        if msg.length > self.max_context:
            raise ContextTooLong(f"KV of {msg.length} positions exceeds the context of {self.max_context}")
        shapes = self.bundle.shapes
        expected = (1, shapes.num_kv_heads, msg.length, shapes.head_dim)
        limit = int(np.prod(expected))
        check_shape("KVPut.key", msg.key, expected)
        check_shape("KVPut.value", msg.value, expected)
        kv.set(msg.unit, codecs.decode(msg.key, max_elements=limit), codecs.decode(msg.value, max_elements=limit))

    @staticmethod
    def kv_get(kv: SessionKV, msg: wire.KVGet) -> wire.KVData:
        """Hand a layer's KV to the client and forget it here (the layer moves to the client)."""
        key, value = kv.get(msg.unit)
        reply = wire.KVData(seq=msg.seq, unit=msg.unit, length=int(key.shape[2]),
                            key=codecs.encode(key, "fp32"), value=codecs.encode(value, "fp32"))
        kv.drop(range(msg.unit, msg.unit + 1))
        return reply

    # ------------------------------------------------------------------ jobs

    def admit(self, job: Job, kv: SessionKV, msg: wire.Run) -> None:
        """Check the session's KV against the Run and decode its payload; raises SplitLLMError."""
        if self.stores.get(job.slot) is not kv:
            raise SessionStateError("the session was closed before its step ran")
        for unit in range(max(msg.start, 1), min(msg.end, self.bundle.num_units - 1)):
            have = kv.length(unit)
            if have != msg.past_len:
                raise SessionStateError(f"unit {unit} holds {have} positions on the server, the request "
                                        f"says past_len={msg.past_len}")
        self._work[job.id] = _Work(msg, kv, decode_run_input(msg, self.bundle.shapes)[0])

    def forget(self, job_id: int, *, failed: bool) -> None:
        """Drop a job's arrays; a failed job's positions already written (earlier pieces or
        chunks) are cut back, so the session's KV is as before the Run, as the client assumes."""
        work = self._work.pop(job_id, None)
        if work is not None and failed:
            work.kv.truncate(work.msg.past_len, range(work.msg.start, work.msg.end))

    def reply(self, job: Job, timing: RunTiming) -> wire.Result:
        """The finished job's Result: the sampled token, the verification's argmax per position, or
        the encoded output. Raises SplitLLMError (an encoding failure)."""
        work = self._work.pop(job.id)
        msg = work.msg
        if msg.want == "token":
            assert work.hidden is not None  # noqa: S101 - the head's logits
            params = SamplingParams(msg.temperature, msg.top_p, msg.top_k, msg.seed)
            token = sample(work.hidden[-1], params, position=msg.past_len + msg.n_tokens)
            return wire.Result(seq=msg.seq, token=token, payload=b"", server_ms=timing.compute_ms,
                               queue_ms=timing.queue_ms)
        if msg.want == "tokens":
            logits = np.concatenate(work.outputs, axis=0)  # (T, V): every position's
            return wire.Result(seq=msg.seq, token=-1, payload=logits.argmax(axis=-1).astype("<i4").tobytes(),
                               server_ms=timing.compute_ms, queue_ms=timing.queue_ms)
        out = np.concatenate(work.outputs, axis=0)[None]  # (1, T, H) or logits
        return wire.Result(seq=msg.seq, token=-1, payload=codecs.encode(out, msg.codec),
                           server_ms=timing.compute_ms, queue_ms=timing.queue_ms)

    # ------------------------------------------------------------------ pieces

    def load_pieces(self, start: int, end: int) -> list[Piece]:
        """The loaded pieces that run ``[start, end)`` in order (built now if needed)."""
        return [self.piece_cache.get(a, b) for a, b in cut(start, end, self.chunk_units)]

    def readiness(self, keys: Sequence[PieceKey]) -> Readiness:
        """Which of ``keys`` are loaded. A missing piece is built on the loader thread meanwhile
        (``on_built`` is called when it is done); one that failed to build is reported failed."""
        ready: set[PieceKey] = set()
        failed: dict[PieceKey, Exception] = {}
        for key in keys:
            try:
                if self.piece_cache.ready(key, on_built=self._on_built):
                    ready.add(key)
            except Exception as exc:  # the build's error (ORT's own types, or ours)
                log.error("loading units [%d, %d) failed: %s", key[0], key[1], exc)
                failed[key] = RuntimeFailure(f"loading units [{key[0]}, {key[1]}) on the server failed: {exc}")
        return Readiness(ready, failed)

    def close(self) -> None:
        self.piece_cache.clear()

    # ------------------------------------------------------------------ steps

    def execute(self, step: Step) -> StepOutput:
        """Run the step's rows at its piece (loaded: ``readiness`` said so)."""
        piece = self.piece_cache.get(*step.key)
        failed: dict[int, Exception] = {}
        began = time.perf_counter()
        if piece.pooled and self.pool is not None:
            self._run_pooled(piece, sorted(step.rows, key=lambda r: r.slot), failed)
        else:
            for row in step.rows:
                self._run_one(piece, row, failed)
        seconds = time.perf_counter() - began
        for row in step.rows:
            work = self._work[row.job]
            if row.last_piece and row.job not in failed:
                assert work.hidden is not None  # noqa: S101 - set by the piece just run
                if work.msg.want in ("hidden", "tokens"):
                    work.outputs.append(work.hidden)  # every position's hidden state or logits, chunk after chunk
                elif work.msg.want == "logits":
                    work.outputs = [work.hidden]  # the head keeps the last position's logits only
        return StepOutput(seconds, failed)

    def _run_pooled(self, piece: Piece, rows: list[StepRow], failed: dict[int, Exception]) -> None:
        """Run ``rows`` (sorted by slot) at ``piece`` over their pool rows, in spans of nearby slots."""
        pool = self.pool
        assert pool is not None  # noqa: S101 - execute checked it
        spans: list[list[StepRow]] = [[rows[0]]]
        for row in rows[1:]:
            if row.slot - spans[-1][-1].slot > _IDLE_GAP_ROWS + 1:
                spans.append([row])
            else:
                spans[-1].append(row)
        for span in spans:
            batch = [BatchRow(r.slot, self._input(r), r.past_len) for r in span]
            try:
                for row in span:
                    self._check_past(row, piece)
                out = piece.run_rows(pool, batch, span[0].slot, span[-1].slot)
            except SplitLLMError as exc:
                if len(span) == 1:
                    failed[span[0].job] = exc
                    continue
                for row in span:  # find the culprit: each alone, the others unharmed
                    self._run_pooled(piece, [row], failed)
                continue
            for row, y in zip(span, out, strict=True):
                self._work[row.job].hidden = y

    def _run_one(self, piece: Piece, row: StepRow, failed: dict[int, Exception]) -> None:
        try:
            self._check_past(row, piece)
            cache = self._caches.get(row.slot)
            if cache is None:
                raise SessionStateError("a piece without fused layers needs the session's own KV cache")
            self._work[row.job].hidden = piece.segment.run(self._input(row)[None], cache, row.past_len)[0]
        except SplitLLMError as exc:
            failed[row.job] = exc

    def _input(self, row: StepRow) -> np.ndarray:
        work = self._work[row.job]
        if row.first_piece:
            return work.x[row.begin:row.end]
        assert work.hidden is not None  # noqa: S101 - set by the previous piece
        return work.hidden

    def _check_past(self, row: StepRow, piece: Piece) -> None:
        kv = self._work[row.job].kv
        for unit in piece.layer_units:
            have = kv.length(unit)
            if have != row.past_len:
                raise SessionStateError(f"unit {unit} holds {have} positions on the server, expected {row.past_len}")
