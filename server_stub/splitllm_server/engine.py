"""The server's math: continuous batching of every session's steps, per piece, off the event loop.

One scheduler thread owns the ORT sessions and the KV pools. The handler submits a whole Run
(payload bytes and all) and gets back the Result to send; everything between, decoding the
payload, the ORT runs, sampling and encoding, happens here. Other requests that touch a
session's KV (Truncate, KVPut, KVGet) run on the same thread between pieces, so a cache is never
read and written at once.

Scheduling (``docs/architecture.md`` has the picture and the reasons):

- A Run becomes a *job* that walks the server pieces of its range (``pieces.cut``). Decode jobs
  (one position) that wait at the same piece run as one batch over their KV pool rows, up to
  ``max_batch`` rows; the piece that comes first in the model always runs first, so jobs that
  entered at different splits meet at the shared tail pieces and run them together.
- Sessions join and leave between pieces: a new job enters at its first piece in the next
  sweep, a finished one answers at once.
- A prompt (more than one position) runs in chunks, one chunk-piece at a time, interleaved with
  the decode batches. While decode steps wait, a chunk is sized from the measured costs so that
  one of its pieces takes about half as long as a piece of the decode batch: a long prompt
  stretches the others' steps by about 1.5x; alone, it runs in chunks of ``prefill_chunk``.
- Before a batch smaller than the sessions active here (a step in the last ``ACTIVE_S``), the
  scheduler waits up to ``batch_window_ms`` for the others' steps to arrive; a session that runs
  everything on its device is not waited for.
- A job that fails (bad input, ORT error) fails alone: its future gets the error, its rows'
  lengths are left as they were, and the batch it was in is retried without it.

``max_batch=1`` runs one session's step at a time (the pre-batching engine, kept for comparison).
Bundles whose layers are exported graphs (no fused attention) cannot batch across sessions and
always run one at a time, with a per-session cache.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitllm import codec as codecs
from splitllm.errors import (
    ConfigError,
    ContextTooLong,
    RuntimeFailure,
    SessionStateError,
    SplitLLMError,
    TooManySessions,
)
from splitllm.model.bundle import DEFAULT_VARIANT, Bundle
from splitllm.model.runtime import KVCache, RuntimeOptions
from splitllm.model.sampling import SamplingParams, sample
from splitllm.protocol import wire
from splitllm.protocol.payload import decode_run_input
from splitllm_server.config import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_CHUNK_UNITS,
    DEFAULT_MAX_BATCH,
    DEFAULT_PREFILL_CHUNK,
)
from splitllm_server.kvpool import KVPool, PooledKV
from splitllm_server.pieces import BatchRow, Piece, PieceCache, cut

__all__ = ["Engine", "RunTiming"]

log = logging.getLogger("splitllm.server.engine")

_MIN_CHUNK = 8  # positions: below this a chunk costs more in per-run overhead than it saves
_PROMPT_SHARE = 0.5  # a prompt's chunk-piece may take this fraction of a decode batch's piece
_EWMA = 0.2
_DECODE_RECENT_S = 1.0  # a decode batch this recent means sessions are decoding
ACTIVE_S = 2.0  # a session whose last step here is older than this is not counted as a batch row
_IDLE_GAP_ROWS = 8  # a span is cut where more idle rows than this lie between two real ones


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EWMA) * old + _EWMA * new


@dataclass(frozen=True)
class RunTiming:
    queue_ms: float
    compute_ms: float


@dataclass
class _Job:
    """One Run on its way through the server pieces of its range."""

    slot: int
    kv: Any  # PooledKV or KVCache (same interface)
    msg: wire.Run
    x: np.ndarray  # the whole input: (T,) ids or (T, H) hidden
    pieces: list[tuple[int, int]]
    num_units: int
    future: Future[tuple[wire.Result, RunTiming]]
    enqueued: float
    done_upto: int = 0  # positions of the input that went through every piece
    chunk_end: int = 0  # positions [done_upto, chunk_end) are the chunk under way
    piece: int = 0  # index of the chunk's next piece
    hidden: np.ndarray | None = None  # the chunk's current activations
    outputs: list[np.ndarray] = field(default_factory=list)  # finished chunks (want != token)
    started: float | None = None
    compute_s: float = 0.0

    @property
    def chunk_len(self) -> int:
        return self.chunk_end - self.done_upto

    @property
    def next_piece(self) -> tuple[int, int, bool]:
        """(start, end, last_only) of the piece the job runs next; the head keeps every position's
        logits for a verification (want="tokens"), else the last one's."""
        start, end = self.pieces[self.piece]
        return start, end, end == self.num_units and self.msg.want != "tokens"


class Engine:
    """Runs every session's steps; one instance per server process.

    ``max_sessions`` and ``max_context`` size the KV pools (memory bound in ``kvpool``).
    """

    def __init__(self, bundle: Bundle, *, cache_size: int, options: RuntimeOptions, variant: str = DEFAULT_VARIANT,
                 chunk_units: int = DEFAULT_CHUNK_UNITS, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_sessions: int = 256, max_context: int | None = None) -> None:
        if chunk_units < 0:
            raise ConfigError(f"chunk_units must be >= 0, got {chunk_units}")
        if max_batch < 1 or prefill_chunk < 1 or not batch_window_ms >= 0:
            raise ConfigError(f"max_batch and prefill_chunk must be >= 1 and batch_window_ms >= 0, got "
                              f"{max_batch}, {prefill_chunk}, {batch_window_ms}")
        self.bundle = bundle
        self.variant = bundle.check_variant(variant)
        self.options = options
        self.chunk_units = chunk_units
        self.cache_size = cache_size
        self.max_batch = max_batch
        self.batch_window_s = batch_window_ms / 1e3
        self.prefill_chunk = prefill_chunk
        self.max_context = max_context or bundle.shapes.max_context
        # cache_size ranges' worth of pieces: a range has at most ceil(units / chunk) + 1 of them.
        per_range = 1 if chunk_units == 0 else -(-bundle.num_units // chunk_units) + 1
        self.pieces_cache = PieceCache(bundle, options, self.variant, cache_size * per_range)
        # Fused layers batch over pool rows; exported layer graphs keep a cache per session.
        self.pooled = bundle.manifest.get("export", {}).get("layer_graphs") == "fused"
        self.pool = KVPool(bundle.shapes, max_sessions, self.max_context) if self.pooled else None
        self._free_slots = list(range(max_sessions - 1, -1, -1))  # for caches outside the pool
        self.compute_seconds = 0.0
        self.runs = 0
        self.unit_seconds = np.zeros(bundle.num_units, dtype=np.float64)
        self.batch_rows = 0  # rows of real steps run (idle rows not counted)
        self._recent: deque[tuple[float, float]] = deque(maxlen=4096)  # (finished at, seconds)
        self._cond = threading.Condition()
        self._incoming: deque[_Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._jobs: list[_Job] = []
        self._open: dict[int, Any] = {}  # slot -> the KV store of the session holding it
        # slot -> (monotonic time, start, end) of the session's latest Run: which units it keeps
        # busy here. Written on the event loop (``run``), read as a copy from any thread.
        self._last_range: dict[int, tuple[float, int, int]] = {}
        self._stop = False
        self._observers: list[Callable[[str, float], None]] = []
        self._thread = threading.Thread(target=self._loop, name="splitllm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ sessions

    async def open_session(self) -> tuple[int, Any]:
        """A slot and an empty KV store for a new session (TooManySessions when none is free)."""
        def take() -> tuple[int, Any]:
            kv: Any
            if self.pool is not None:
                slot = self.pool.take()
                kv = PooledKV(self.pool, slot)
            elif self._free_slots:
                slot = self._free_slots.pop()
                kv = KVCache(self.bundle.shapes)
            else:
                raise TooManySessions("the server holds its maximum of sessions; try again later")
            self._open[slot] = kv
            return slot, kv
        return await self.call(take)

    def close_session(self, slot: int) -> None:
        """Free a session's slot; its KV is forgotten and any step of it still queued is dropped.
        Safe to call from any thread."""
        def give_back() -> None:
            self._last_range.pop(slot, None)
            if self._open.pop(slot, None) is None:
                return
            for job in [j for j in self._jobs if j.slot == slot]:
                self._jobs.remove(job)
                if not job.future.done():
                    job.future.set_exception(SessionStateError("the session was closed during its step"))
            if self.pool is not None:
                self.pool.give_back(slot)
            else:
                self._free_slots.append(slot)
        self._submit_call(give_back)

    # ------------------------------------------------------------------ submitting work

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        return cut(start, end, self.chunk_units)

    async def run(self, slot: int, kv: Any, msg: wire.Run) -> tuple[wire.Result, RunTiming]:
        """Run ``msg`` for the session in ``slot``; returns its Result (token sampled or output
        encoded) and timing. Raises the SplitLLMError the run met (the session's KV unchanged)."""
        future: Future[tuple[wire.Result, RunTiming]] = Future()
        job = _Job(slot=slot, kv=kv, msg=msg, x=np.empty(0), pieces=self.pieces(msg.start, msg.end),
                   num_units=self.bundle.num_units, future=future, enqueued=time.perf_counter())
        self._last_range[slot] = (time.monotonic(), msg.start, msg.end)
        with self._cond:
            self._incoming.append(job)
            self._cond.notify()
        return await asyncio.wrap_future(future)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread, between pieces (for anything touching KV)."""
        return await asyncio.wrap_future(self._submit_call(lambda: fn(*args)))

    def _submit_call(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._stop:
                future.set_exception(ConfigError("the engine is closed"))
                return future
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def call_blocking(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the engine thread and wait for it here (not from the event loop)."""
        return self._submit_call(fn).result()

    def segments(self, start: int, end: int) -> list[Piece]:
        """The loaded pieces that run ``[start, end)`` in order (built now if needed); blocks."""
        return self.call_blocking(lambda: self._load_pieces(start, end))

    async def warm_up(self, start: int, end: int) -> None:
        """Load the pieces of ``[start, end)`` before a client needs them."""
        await self.call(self._load_pieces, start, end)

    def _load_pieces(self, start: int, end: int) -> list[Piece]:
        return [self.pieces_cache.get(a, b) for a, b in self.pieces(start, end)]

    def observe(self, fn: Callable[[str, float], None]) -> None:
        """Call ``fn(name, value)`` from the engine thread for every "batch_rows", "step_ms" and
        "queue_ms" observation (metrics hook)."""
        self._observers.append(fn)

    # ------------------------------------------------------------------ load figures

    def utilisation(self, window_s: float = 10.0) -> float:
        """Fraction of the last ``window_s`` seconds the engine spent computing."""
        cutoff = time.perf_counter() - window_s
        busy = sum(seconds for finished, seconds in list(self._recent) if finished >= cutoff)
        return min(busy / window_s, 1.0)

    def load_factor(self) -> float:
        """How much longer a run takes end to end on this server now: 1 / (1 - utilisation), the
        M/M/1 stretch of response time, capped at 10 (utilisation counted up to 0.9)."""
        return 1.0 / (1.0 - min(self.utilisation(), 0.9))

    @property
    def live_sessions(self) -> int:
        """Sessions holding a slot."""
        return len(self._open)

    def _active(self) -> list[tuple[int, int, int]]:
        """(slot, start, end) of the open sessions that ran on this server in the last ACTIVE_S."""
        cutoff = time.monotonic() - ACTIVE_S
        return [(slot, start, end) for slot, (at, start, end) in self._last_range.copy().items()
                if at >= cutoff and slot in self._open]

    def active_sessions(self) -> int:
        """Sessions that ran a step here in the last ACTIVE_S seconds: a session that runs every
        unit on its device holds a slot but never joins a batch (the batch window waits for these)."""
        return len(self._active())

    def unit_rows(self, exclude_slot: int | None = None) -> list[int]:
        """Per unit, the active sessions whose latest step ran it here (the asker's own left out):
        the rows a new session's step at that unit would join."""
        rows = [0] * self.bundle.num_units
        for slot, start, end in self._active():
            if slot != exclude_slot:
                for unit in range(start, end):
                    rows[unit] += 1
        return rows

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.pieces_cache.clear()

    # ------------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._incoming or self._calls or self._jobs):
                    self._cond.wait()
                if self._stop:
                    self._fail_all(ConfigError("the server is shutting down"))
                    return
                calls = list(self._calls)
                self._calls.clear()
                incoming = list(self._incoming)
                self._incoming.clear()
            for fn, future in calls:
                self._do_call(fn, future)
            try:
                for job in incoming:
                    self._admit(job)
                if self._jobs:
                    self._run_next()
            except Exception:  # a bug of ours: fail the steps under way, keep the engine serving
                log.exception("internal error in the engine; failing the steps under way")
                error = RuntimeFailure("internal server error in the engine")
                for job in list(self._jobs):
                    self._fail(job, error)

    @staticmethod
    def _do_call(fn: Callable[[], Any], future: Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller, whatever it is
            future.set_exception(exc)

    def _fail_all(self, error: BaseException) -> None:
        for job in [*self._jobs, *self._incoming]:
            if not job.future.done():
                job.future.set_exception(error)
        self._jobs.clear()
        self._incoming.clear()
        for _, future in self._calls:
            if not future.done():
                future.set_exception(error)
        self._calls.clear()

    def _admit(self, job: _Job) -> None:
        """Decode the payload and check the session's KV; a bad job fails here, alone."""
        if not job.future.set_running_or_notify_cancel():
            return
        msg = job.msg
        kv: Any = job.kv
        if job.slot not in self._open or self._open[job.slot] is not kv:
            job.future.set_exception(SessionStateError("the session was closed before its step ran"))
            return
        try:
            if msg.past_len + msg.n_tokens > self.max_context:
                raise ContextTooLong(f"{msg.past_len} cached + {msg.n_tokens} new positions exceed the context "
                                     f"of {self.max_context}")
            for unit in range(max(msg.start, 1), min(msg.end, self.bundle.num_units - 1)):
                have = kv.length(unit)
                if have != msg.past_len:
                    raise SessionStateError(f"unit {unit} holds {have} positions on the server, the request "
                                            f"says past_len={msg.past_len}")
            job.x = decode_run_input(msg, self.bundle.shapes)[0]
        except SplitLLMError as exc:
            job.future.set_exception(exc)
            return
        job.chunk_end = self._chunk_end(job)
        self._jobs.append(job)

    def _chunk_end(self, job: _Job) -> int:
        """Where the job's next chunk ends. While others decode, a chunk is sized so that one
        piece of it takes about half as long as a piece of their batch (so their steps stretch by
        about 1.5x while a prompt runs); alone, it takes ``prefill_chunk`` positions."""
        total = job.msg.n_tokens
        if total == 1:
            return 1
        size = self.prefill_chunk
        # Others are decoding if one of their steps waits now or a decode batch ran moments ago
        # (between two steps a session's job is on its way back from the client).
        decoding = (any(j.msg.n_tokens == 1 for j in self._jobs)
                    or time.perf_counter() - self._last_decode_at < _DECODE_RECENT_S)
        if decoding:
            if self._decode_piece_s is not None and self._prompt_token_s is not None:
                size = int(_PROMPT_SHARE * self._decode_piece_s / self._prompt_token_s)
            else:
                size = sum(1 for j in self._jobs if j.msg.n_tokens == 1)  # rows cost about the same
            size = max(_MIN_CHUNK, min(size, self.prefill_chunk))
        return min(total, job.done_upto + size)

    def _runnable(self) -> list[_Job]:
        """The jobs whose next piece is loaded. A missing piece is built on the loader thread
        meanwhile (the others' steps go on); a piece that fails to build fails its jobs."""
        ready: dict[tuple[int, int, bool], bool] = {}
        runnable = []
        for job in list(self._jobs):
            key = job.next_piece
            if key not in ready:
                try:
                    ready[key] = self.pieces_cache.ready(key, on_built=self._piece_built)
                except Exception as exc:  # the build's error (ORT's own types, or ours)
                    log.error("loading units [%d, %d) failed: %s", key[0], key[1], exc)
                    failure = RuntimeFailure(f"loading units [{key[0]}, {key[1]}) on the server failed: {exc}")
                    for other in [j for j in self._jobs if j.next_piece == key]:
                        self._fail(other, failure)
                    ready[key] = False
            if ready[key] and not job.future.done():
                runnable.append(job)
        return runnable

    def _piece_built(self) -> None:
        with self._cond:
            self._built = True
            self._cond.notify()

    _built = False

    def _run_next(self) -> None:
        """Run one piece: the batch of decode steps at the earliest piece, or one prompt chunk."""
        runnable = self._runnable()
        if not runnable:  # every job waits for a piece being built
            with self._cond:
                self._cond.wait_for(lambda: bool(self._built or self._incoming or self._calls or self._stop
                                                 or not self._jobs))
                self._built = False
            return
        decode = [j for j in runnable if j.chunk_len == 1]
        prompts = [j for j in runnable if j.chunk_len > 1]
        # Alternate: a prompt chunk after every decode batch, so neither starves.
        if prompts and (not decode or self._last_was_decode):
            job = prompts[0]
            self._last_was_decode = False
            self._run_group(job.next_piece, [job])
            return
        first = min(j.next_piece for j in decode)
        group = [j for j in decode if j.next_piece == first]
        fresh = [j.enqueued for j in group if j.started is None]
        if (fresh and self.batch_window_s > 0 and len(group) < self.max_batch
                and len(self._jobs) < self.active_sessions()):
            # Other sessions' steps may be on their way: a step waits at most the window for them.
            wait_s = min(fresh) + self.batch_window_s - time.perf_counter()
            if wait_s > 0:
                with self._cond:
                    self._cond.wait_for(lambda: bool(self._incoming or self._calls or self._stop), wait_s)
                return
        self._last_was_decode = True
        self._run_group(first, group[:self.max_batch])

    _last_was_decode = False
    _decode_piece_s: float | None = None
    _last_decode_at = 0.0
    _prompt_token_s: float | None = None

    def _run_group(self, key: tuple[int, int, bool], group: list[_Job]) -> None:
        piece = self.pieces_cache.get(*key)  # loaded (``_runnable``)
        began = time.perf_counter()
        for job in group:
            if job.started is None:
                job.started = began
        if piece.pooled and self.pool is not None:
            self._run_pooled(piece, group)
        else:
            for job in group:
                self._run_one(piece, job)
        seconds = time.perf_counter() - began
        self.compute_seconds += seconds
        self.runs += 1
        self._recent.append((time.perf_counter(), seconds))
        self.unit_seconds[piece.start:piece.end] += seconds / (piece.end - piece.start)
        for obs in self._observers:
            obs("batch_rows", float(len(group)))
            obs("step_ms", seconds * 1e3)
        # Running costs that size prompt chunks (per piece, so piece lengths average out).
        if group[0].chunk_len == 1:
            self._decode_piece_s = _ewma(self._decode_piece_s, seconds)
            self._last_decode_at = time.perf_counter()
        else:
            self._prompt_token_s = _ewma(self._prompt_token_s, seconds / group[0].chunk_len)
        for job in group:
            job.compute_s += seconds  # the job waited for the whole run, whatever its share
            self._advance(job)

    def _run_pooled(self, piece: Piece, group: list[_Job]) -> None:
        """Run ``group`` at ``piece`` over its pool rows, in spans of nearby slots."""
        pool = self.pool
        assert pool is not None  # noqa: S101 - _run_group checked it
        group.sort(key=lambda j: j.slot)
        spans: list[list[_Job]] = [[group[0]]]
        for job in group[1:]:
            if job.slot - spans[-1][-1].slot > _IDLE_GAP_ROWS + 1:
                spans.append([job])
            else:
                spans[-1].append(job)
        for span in spans:
            rows = [BatchRow(j.slot, self._chunk_input(j), j.msg.past_len + j.done_upto) for j in span]
            try:
                for job, row in zip(span, rows, strict=True):
                    self._check_past(job, piece, row.past_len)
                out = piece.run_rows(pool, rows, span[0].slot, span[-1].slot)
            except SplitLLMError as exc:
                if len(span) == 1:
                    self._fail(span[0], exc)
                    continue
                for job in span:  # find the culprit: each alone, the others unharmed
                    self._run_pooled(piece, [job])
                continue
            for job, y in zip(span, out, strict=True):
                job.hidden = y

    def _run_one(self, piece: Piece, job: _Job) -> None:
        try:
            x = self._chunk_input(job)[None]
            past = job.msg.past_len + job.done_upto
            self._check_past(job, piece, past)
            job.hidden = piece.segment.run(x, job.kv, past)[0]
        except SplitLLMError as exc:
            self._fail(job, exc)

    @staticmethod
    def _chunk_input(job: _Job) -> np.ndarray:
        if job.piece == 0:
            return job.x[job.done_upto:job.chunk_end]
        assert job.hidden is not None  # noqa: S101 - set by the previous piece
        return job.hidden

    @staticmethod
    def _check_past(job: _Job, piece: Piece, past: int) -> None:
        for unit in piece.layer_units:
            have = job.kv.length(unit)
            if have != past:
                raise SessionStateError(f"unit {unit} holds {have} positions on the server, expected {past}")

    def _fail(self, job: _Job, exc: SplitLLMError) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
        # Positions this job already wrote (earlier pieces or chunks) are cut back: the session's
        # KV is as it was before the Run, as the client assumes after an error.
        job.kv.truncate(job.msg.past_len, range(job.msg.start, job.msg.end))
        if not job.future.done():
            job.future.set_exception(exc)

    def _advance(self, job: _Job) -> None:
        if job.future.done():  # failed in this run
            return
        job.piece += 1
        if job.piece < len(job.pieces):
            return
        # The chunk went through every piece.
        assert job.hidden is not None  # noqa: S101 - set by the last piece
        if job.msg.want in ("hidden", "tokens"):
            job.outputs.append(job.hidden)  # every position's hidden state or logits, chunk after chunk
        elif job.msg.want == "logits":
            job.outputs = [job.hidden]  # the head keeps the last position's logits only
        job.done_upto = job.chunk_end
        if job.done_upto < job.msg.n_tokens:
            job.piece = 0
            job.chunk_end = self._chunk_end(job)
            return
        self._jobs.remove(job)
        try:
            job.future.set_result(self._reply(job))
        except SplitLLMError as exc:
            job.future.set_exception(exc)

    def _reply(self, job: _Job) -> tuple[wire.Result, RunTiming]:
        msg = job.msg
        # Everything the job spent in the engine that was not a run it took part in is queueing:
        # waiting for its first piece and for other pieces between its own. The client subtracts
        # both from a request's wall time to estimate the network's share.
        in_engine_ms = (time.perf_counter() - job.enqueued) * 1e3
        timing = RunTiming(queue_ms=max(0.0, in_engine_ms - job.compute_s * 1e3), compute_ms=job.compute_s * 1e3)
        for obs in self._observers:
            obs("queue_ms", timing.queue_ms)
        if msg.want == "token":
            assert job.hidden is not None  # noqa: S101 - the head's logits
            params = SamplingParams(msg.temperature, msg.top_p, msg.top_k, msg.seed)
            token = sample(job.hidden[-1], params, position=msg.past_len + msg.n_tokens)
            result = wire.Result(seq=msg.seq, token=token, payload=b"", server_ms=timing.compute_ms,
                                 queue_ms=timing.queue_ms)
        elif msg.want == "tokens":
            logits = np.concatenate(job.outputs, axis=0)  # (T, V): every position's
            result = wire.Result(seq=msg.seq, token=-1, payload=logits.argmax(axis=-1).astype("<i4").tobytes(),
                                 server_ms=timing.compute_ms, queue_ms=timing.queue_ms)
        else:
            out = np.concatenate(job.outputs, axis=0)[None]  # (1, T, H) or logits
            result = wire.Result(seq=msg.seq, token=-1, payload=codecs.encode(out, msg.codec),
                                 server_ms=timing.compute_ms, queue_ms=timing.queue_ms)
        return result, timing
