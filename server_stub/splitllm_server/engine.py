"""The server's math, off the event loop: one thread that wires the scheduler to the executor.

The handler submits a whole Run (payload bytes and all) with :meth:`Engine.run` and gets back
the Result to send. On the engine's thread, each turn takes the queued calls and Runs, admits
the Runs (the context check is the scheduler's, the KV and payload checks the executor's), then
runs one step: :func:`~splitllm_server.scheduler.cycle` asks the scheduler what runs next
(``scheduler``: queue, batching, chunk sizing, load figures), has the executor run it
(``executor``: pieces, KV stores, ORT, replies) and reads the outcome back; the engine then
answers the jobs that finished or failed. Other requests that touch a session's KV (Truncate,
KVPut, KVGet) run on the same thread through :meth:`Engine.call`, between steps, so a cache is
never read and written at once.

``max_batch=1`` runs one session's step at a time (the pre-batching engine, kept for comparison).
Bundles whose layers are exported graphs (no fused attention) cannot batch across sessions and
always run one at a time, with a per-session cache.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from splitllm.errors import ConfigError, ContextTooLong, RuntimeFailure, SessionStateError, SplitLLMError
from splitllm.model.bundle import DEFAULT_VARIANT, Bundle
from splitllm.model.runtime import RuntimeOptions
from splitllm.protocol import wire
from splitllm_server.config import (
    DEFAULT_ACTIVE_WINDOW_S,
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_CHUNK_UNITS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_PREFILL_CHUNK,
)
from splitllm_server.executor import Executor
from splitllm_server.kvpool import SessionKV
from splitllm_server.scheduler import Job, RunTiming, Scheduler, Wait, cycle

__all__ = ["Engine", "RunTiming"]

log = logging.getLogger("splitllm.server.engine")

Reply = tuple[wire.Result, RunTiming]


@dataclass
class _Request:
    """A Run on its way from the event loop to the engine's thread."""

    job: Job
    kv: SessionKV
    msg: wire.Run
    future: Future[Reply]


class Engine:
    """Runs every session's steps; one instance per server process.

    ``scheduler`` and ``executor`` are its two halves; the load figures ``/v1/plan`` prices with
    are the scheduler's. Raises ConfigError for settings out of range.
    """

    def __init__(self, bundle: Bundle, *, cache_size: int, options: RuntimeOptions, variant: str = DEFAULT_VARIANT,
                 chunk_units: int = DEFAULT_CHUNK_UNITS, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, max_context: int | None = None,
                 active_window_s: float = DEFAULT_ACTIVE_WINDOW_S) -> None:
        if chunk_units < 0:
            raise ConfigError(f"chunk_units must be >= 0, got {chunk_units}")
        if not active_window_s > 0:
            raise ConfigError(f"active_window_s must be > 0, got {active_window_s}")
        if max_batch < 1 or prefill_chunk < 1 or not batch_window_ms >= 0:
            raise ConfigError(f"max_batch and prefill_chunk must be >= 1 and batch_window_ms >= 0, got "
                              f"{max_batch}, {prefill_chunk}, {batch_window_ms}")
        model_max = bundle.shapes.max_context
        self.max_context = min(max_context, model_max) if max_context else model_max
        self.executor = Executor(bundle, cache_size=cache_size, options=options, variant=variant,
                                 chunk_units=chunk_units, max_sessions=max_sessions, max_context=self.max_context,
                                 on_built=self._piece_built)
        self.scheduler = Scheduler(bundle.num_units, chunk_units=chunk_units, max_batch=max_batch,
                                   batch_window_ms=batch_window_ms, prefill_chunk=prefill_chunk,
                                   max_context=self.max_context, active_s=active_window_s)
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._incoming: deque[_Request] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._futures: dict[int, Future[Reply]] = {}  # job id -> its answer, for the admitted jobs
        self._built = False  # a piece finished building since the engine last looked
        self._stop = False
        self._observers: list[Callable[[str, float], None]] = []
        self._thread = threading.Thread(target=self._loop, name="splitllm-engine", daemon=True)
        self._thread.start()

    @property
    def runs(self) -> int:
        """Steps run so far (the scheduler's count; /metrics ``splitllm_runs_total``)."""
        return self.scheduler.runs

    # ------------------------------------------------------------------ submitting work

    async def open_session(self) -> tuple[int, SessionKV]:
        """A slot and an empty KV store for a new session (TooManySessions when none is free)."""
        def take() -> tuple[int, SessionKV]:
            slot, kv = self.executor.open_session()
            self.scheduler.open(slot)
            return slot, kv
        result: tuple[int, SessionKV] = await self.call(take)
        return result

    def close_session(self, slot: int) -> None:
        """Free a session's slot; its KV is forgotten and any step of it still queued is dropped.
        Safe to call from any thread."""
        def give_back() -> None:
            self.executor.close_session(slot)
            for job in self.scheduler.close(slot):  # its KV is gone: nothing to cut back
                self._fail(job, SessionStateError("the session was closed during its step"), cut_back=False)
        self._submit_call(give_back)

    async def run(self, slot: int, kv: SessionKV, msg: wire.Run) -> Reply:
        """Run ``msg`` for the session in ``slot``; returns its Result (token sampled or output
        encoded) and timing. Raises the SplitLLMError the run met (the session's KV unchanged)."""
        future: Future[Reply] = Future()
        job = self.scheduler.job(next(self._ids), slot, msg.start, msg.end, msg.want, msg.past_len, msg.n_tokens)
        self.scheduler.note_range(slot, msg.start, msg.end)
        with self._cond:
            self._incoming.append(_Request(job, kv, msg, future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread, between steps (for anything touching KV)."""
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

    async def warm_up(self, start: int, end: int) -> None:
        """Load the pieces of ``[start, end)`` before a client needs them."""
        await self.call(self.executor.load_pieces, start, end)

    def observe(self, fn: Callable[[str, float], None]) -> None:
        """Call ``fn(name, value)`` from the engine thread for every "batch_rows", "step_ms" and
        "queue_ms" observation (metrics hook)."""
        self._observers.append(fn)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.executor.close()

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._incoming or self._calls or self.scheduler.jobs):
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
                for request in incoming:
                    self._admit(request)
                if self.scheduler.jobs:
                    self._turn()
            except Exception:  # a bug of ours: fail the steps under way, keep the engine serving
                log.exception("internal error in the engine; failing the steps under way")
                error = RuntimeFailure("internal server error in the engine")
                for job in list(self.scheduler.jobs):
                    self.scheduler.jobs.remove(job)
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
        futures = [*self._futures.values(), *(r.future for r in self._incoming), *(f for _, f in self._calls)]
        for future in futures:
            if not future.done():
                future.set_exception(error)
        self._futures.clear()
        self.scheduler.jobs.clear()
        self._incoming.clear()
        self._calls.clear()

    def _admit(self, request: _Request) -> None:
        """A bad Run fails here, alone: context (the scheduler's word), then closed session, KV
        lengths and payload (the executor's)."""
        if not request.future.set_running_or_notify_cancel():
            return
        job = request.job
        try:
            if not self.scheduler.fits(job):
                raise ContextTooLong(f"{job.past_len} cached + {job.n_tokens} new positions exceed the context "
                                     f"of {self.scheduler.max_context}")
            self.executor.admit(job, request.kv, request.msg)
        except SplitLLMError as exc:
            request.future.set_exception(exc)
            return
        self._futures[job.id] = request.future
        self.scheduler.admit(job)

    def _piece_built(self) -> None:
        with self._cond:
            self._built = True
            self._cond.notify()

    def _turn(self) -> None:
        """One step (or the wait the scheduler asks for), then the answers it made due."""
        turn = cycle(self.scheduler, self.executor)
        for job, error in turn.failed:
            self._fail(job, error)
        if isinstance(turn.step, Wait):
            timeout_s = turn.step.timeout_s
            with self._cond:
                if timeout_s is None:  # every job waits for a piece being built (or failed with its build)
                    self._cond.wait_for(lambda: bool(self._built or self._incoming or self._calls or self._stop
                                                     or not self.scheduler.jobs))
                    self._built = False
                else:  # the batch window: other sessions' steps may be on their way
                    self._cond.wait_for(lambda: bool(self._incoming or self._calls or self._stop), timeout_s)
            return
        seconds = turn.output.seconds if turn.output is not None else 0.0
        for obs in self._observers:
            obs("batch_rows", float(len(turn.step.rows)))
            obs("step_ms", seconds * 1e3)
        for job in turn.finished:
            timing = self.scheduler.timing(job)
            for obs in self._observers:
                obs("queue_ms", timing.queue_ms)
            future = self._futures.pop(job.id)
            try:
                future.set_result((self.executor.reply(job, timing), timing))
            except SplitLLMError as exc:
                future.set_exception(exc)

    def _fail(self, job: Job, error: BaseException, *, cut_back: bool = True) -> None:
        """Answer a job that left the scheduler with ``error``; ``cut_back``: the positions it
        wrote are cut back (its session's KV as before the Run)."""
        self.executor.forget(job.id, failed=cut_back)
        future = self._futures.pop(job.id, None)
        if future is not None and not future.done():
            future.set_exception(error)
