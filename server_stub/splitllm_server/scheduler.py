"""The server's scheduler: what runs in the next step, decided as data; no ONNX Runtime here.

The engine's thread asks :func:`cycle` for one step: the scheduler names the pieces its queued
jobs wait at, the executor says which are loaded (:class:`Readiness`), :meth:`Scheduler.schedule`
answers with a :class:`Step` (a piece and the rows to run at it) or a :class:`Wait`, the
executor runs the step and reports a :class:`StepOutput`, and :meth:`Scheduler.update` reads it
back. Only these plain objects cross the seam, so the policy below is tested with a fake
executor (``tests/test_scheduler.py``), and this module imports neither ORT nor the SDK (whose
package imports ORT): the engine turns the scheduler's refusals into ``splitllm.errors``.

Policy (``docs/architecture.md`` has the picture and the reasons):

- A Run becomes a :class:`Job` that walks the server pieces of its range (:func:`cut`). Decode
  jobs (one position) that wait at the same piece run as one batch over their KV pool rows, up
  to ``max_batch`` rows; the piece that comes first in the model always runs first, so jobs that
  entered at different splits meet at the shared tail pieces and run them together.
- Sessions join and leave between pieces: a new job enters at its first piece in the next
  sweep, a finished one answers at once.
- A prompt (more than one position) runs in chunks, one chunk-piece at a time, alternating with
  the decode batches. While decode steps wait, a chunk is sized from the measured costs so that
  one of its pieces takes about half as long as a piece of the decode batch: a long prompt
  stretches the others' steps by about 1.5x; alone, it runs in chunks of ``prefill_chunk``.
- Before a batch smaller than the sessions active here (a step in the last ``active_s``, the server's ``--active-window``), the
  scheduler waits up to ``batch_window_ms`` for the others' steps to arrive; a session that runs
  everything on its device is not waited for.
- A job that fails fails alone (the executor retries the rest of its batch without it).

The load figures ``/v1/plan`` prices with live here too: :meth:`Scheduler.unit_rows`,
:meth:`Scheduler.active_sessions`, :meth:`Scheduler.utilisation`, :meth:`Scheduler.load_factor`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["Job", "PieceKey", "Readiness", "RunTiming", "Scheduler", "Step", "StepExecutor",
           "StepOutput", "StepRow", "Wait", "cut", "cycle"]

_MIN_CHUNK = 8  # positions: below this a chunk costs more in per-run overhead than it saves
_PROMPT_SHARE = 0.5  # a prompt's chunk-piece may take this fraction of a decode batch's piece
_EWMA = 0.2
_DECODE_RECENT_S = 1.0  # a decode batch this recent means sessions are decoding

PieceKey = tuple[int, int, bool]  # (start unit, end unit, the head keeps only the last position's logits)


def cut(start: int, end: int, chunk_units: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut at the multiples of ``chunk_units`` inside it (whole with 0)."""
    if chunk_units == 0:
        return [(start, end)]
    cuts = [start, *range((start // chunk_units + 1) * chunk_units, end, chunk_units), end]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EWMA) * old + _EWMA * new


@dataclass(frozen=True)
class RunTiming:
    """Where a Run's time went in the engine: computing (runs it took part in) and the rest."""

    queue_ms: float
    compute_ms: float


@dataclass
class Job:
    """One Run on its way through the server pieces of its range: positions only, no arrays."""

    id: int
    slot: int
    start: int
    end: int
    want: str  # the Run's: "token", "logits", "tokens" or "hidden"
    past_len: int
    n_tokens: int
    pieces: list[tuple[int, int]]
    num_units: int
    enqueued: float  # the scheduler's clock, seconds
    done_upto: int = 0  # positions of the input that went through every piece
    chunk_end: int = 0  # positions [done_upto, chunk_end) are the chunk under way
    piece: int = 0  # index of the chunk's next piece
    started: float | None = None
    compute_s: float = 0.0

    @property
    def chunk_len(self) -> int:
        return self.chunk_end - self.done_upto

    @property
    def next_piece(self) -> PieceKey:
        """(start, end, last_only) of the piece the job runs next; the head keeps every position's
        logits for a verification (want="tokens"), else the last one's."""
        start, end = self.pieces[self.piece]
        return start, end, end == self.num_units and self.want != "tokens"


@dataclass(frozen=True)
class StepRow:
    """One job's part of a step: input positions [begin, end) at a piece."""

    job: int
    slot: int
    begin: int
    end: int
    past_len: int  # positions the session's KV holds in this piece's layers before the row runs
    first_piece: bool  # the input comes from the Run's payload (else the previous piece's output)
    last_piece: bool  # the chunk has been through the whole range after this piece


@dataclass(frozen=True)
class Step:
    """Run these rows at this piece, as one batch where the piece can."""

    key: PieceKey
    rows: tuple[StepRow, ...]


@dataclass(frozen=True)
class Wait:
    """Nothing to run now. ``timeout_s`` None: until a piece finishes building or work arrives;
    else up to that long for other sessions' steps (the batch window)."""

    timeout_s: float | None


@dataclass(frozen=True)
class Readiness:
    """The executor's answer about pieces: which are loaded, which failed to build (and why)."""

    ready: Collection[PieceKey]
    failed: Mapping[PieceKey, Exception] = field(default_factory=dict)


@dataclass(frozen=True)
class StepOutput:
    """What a step did: its wall time, and the rows that failed (job id -> error; their KV as
    before the step). The other rows ran."""

    seconds: float
    failed: Mapping[int, Exception] = field(default_factory=dict)


class StepExecutor(Protocol):
    """What :func:`cycle` needs of an executor (``executor.Executor``, or a test's fake)."""

    def readiness(self, keys: Sequence[PieceKey]) -> Readiness: ...

    def execute(self, step: Step) -> StepOutput: ...


@dataclass(frozen=True)
class Cycle:
    """One turn of the scheduler: the step run (or the wait asked for), the jobs that finished
    and those that failed, with their errors."""

    step: Step | Wait
    output: StepOutput | None
    finished: list[Job]
    failed: list[tuple[Job, Exception]]


def cycle(scheduler: Scheduler, executor: StepExecutor) -> Cycle:
    """Decide the next step, run it on ``executor``, read its output back."""
    readiness = executor.readiness(scheduler.wanted())
    failed = [(job, error) for key, error in readiness.failed.items() for job in scheduler.drop_at(key)]
    step = scheduler.schedule(readiness.ready)
    if isinstance(step, Wait):
        return Cycle(step, None, [], failed)
    output = executor.execute(step)
    finished, step_failed = scheduler.update(step, output)
    return Cycle(step, output, finished, failed + step_failed)


class Scheduler:
    """The queue of jobs, their admission and batching, and the load figures; one per engine.

    Every method runs on the engine's thread except :meth:`note_range` (the event loop) and the
    load figures (any thread; they read copies). ``clock`` is in seconds (tests pass their own).
    """

    def __init__(self, num_units: int, *, chunk_units: int, max_batch: int, batch_window_ms: float,
                 prefill_chunk: int, max_context: int, active_s: float,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.num_units = num_units
        self.chunk_units = chunk_units
        self.max_batch = max_batch
        self.batch_window_s = batch_window_ms / 1e3
        self.prefill_chunk = prefill_chunk
        self.max_context = max_context
        self.active_s = active_s
        self.clock = clock
        self.jobs: list[Job] = []
        self.open_slots: set[int] = set()
        # slot -> (clock, start, end) of the session's latest Run: which units it keeps busy here.
        # Written on the event loop (``note_range``), read as a copy from any thread.
        self._last_range: dict[int, tuple[float, int, int]] = {}
        self._last_was_decode = False
        self._decode_piece_s: float | None = None  # running costs that size prompt chunks
        self._prompt_token_s: float | None = None
        self._last_decode_at = float("-inf")
        self.compute_seconds = 0.0
        self.runs = 0  # steps run
        self.unit_seconds = np.zeros(num_units, dtype=np.float64)
        self._recent: deque[tuple[float, float]] = deque(maxlen=4096)  # (finished at, seconds)

    # ------------------------------------------------------------------ sessions and admission

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """The pieces a job over units ``[start, end)`` runs, in order."""
        return cut(start, end, self.chunk_units)

    def open(self, slot: int) -> None:
        self.open_slots.add(slot)

    def close(self, slot: int) -> list[Job]:
        """Forget the session in ``slot``; returns its queued jobs, dropped (the caller fails them)."""
        self._last_range.pop(slot, None)
        self.open_slots.discard(slot)
        dropped = [j for j in self.jobs if j.slot == slot]
        self.jobs = [j for j in self.jobs if j.slot != slot]
        return dropped

    def note_range(self, slot: int, start: int, end: int) -> None:
        """A Run of the session in ``slot`` over units ``[start, end)`` arrived (event loop)."""
        self._last_range[slot] = (self.clock(), start, end)

    def job(self, job_id: int, slot: int, start: int, end: int, want: str, past_len: int, n_tokens: int) -> Job:
        return Job(id=job_id, slot=slot, start=start, end=end, want=want, past_len=past_len, n_tokens=n_tokens,
                   pieces=self.pieces(start, end), num_units=self.num_units, enqueued=self.clock())

    def fits(self, job: Job) -> bool:
        """Whether the job's positions fit the context (the only context check; the engine raises)."""
        return job.past_len + job.n_tokens <= self.max_context

    def admit(self, job: Job) -> None:
        """Queue a job that passed its checks; it enters at its first piece in the next step."""
        job.chunk_end = self._chunk_end(job)
        self.jobs.append(job)

    def _chunk_end(self, job: Job) -> int:
        """Where the job's next chunk ends. While others decode, a chunk is sized so that one
        piece of it takes about half as long as a piece of their batch (so their steps stretch by
        about 1.5x while a prompt runs); alone, it takes ``prefill_chunk`` positions."""
        total = job.n_tokens
        if total == 1:
            return 1
        size = self.prefill_chunk
        # Others are decoding if one of their steps waits now or a decode batch ran moments ago
        # (between two steps a session's job is on its way back from the client).
        decoding = (any(j.n_tokens == 1 for j in self.jobs)
                    or self.clock() - self._last_decode_at < _DECODE_RECENT_S)
        if decoding:
            if self._decode_piece_s is not None and self._prompt_token_s is not None:
                size = int(_PROMPT_SHARE * self._decode_piece_s / self._prompt_token_s)
            else:
                size = sum(1 for j in self.jobs if j.n_tokens == 1)  # rows cost about the same
            size = max(_MIN_CHUNK, min(size, self.prefill_chunk))
        return min(total, job.done_upto + size)

    # ------------------------------------------------------------------ steps

    def wanted(self) -> list[PieceKey]:
        """The pieces queued jobs wait at, in queue order (each once)."""
        return list(dict.fromkeys(j.next_piece for j in self.jobs))

    def drop_at(self, key: PieceKey) -> list[Job]:
        """Remove and return the jobs waiting at ``key`` (its piece failed to build)."""
        dropped = [j for j in self.jobs if j.next_piece == key]
        self.jobs = [j for j in self.jobs if j.next_piece != key]
        return dropped

    def schedule(self, ready: Collection[PieceKey]) -> Step | Wait:
        """The next step: the batch of decode steps at the earliest loaded piece, or one prompt
        chunk (a prompt chunk after every decode batch, so neither starves)."""
        runnable = [j for j in self.jobs if j.next_piece in ready]
        if not runnable:  # every job waits for a piece being built
            return Wait(None)
        decode = [j for j in runnable if j.chunk_len == 1]
        prompts = [j for j in runnable if j.chunk_len > 1]
        if prompts and (not decode or self._last_was_decode):
            self._last_was_decode = False
            return self._step(prompts[0].next_piece, [prompts[0]])
        first = min(j.next_piece for j in decode)
        group = [j for j in decode if j.next_piece == first]
        fresh = [j.enqueued for j in group if j.started is None]
        if (fresh and self.batch_window_s > 0 and len(group) < self.max_batch
                and len(self.jobs) < self.active_sessions()):
            # Other sessions' steps may be on their way: a step waits at most the window for them.
            wait_s = min(fresh) + self.batch_window_s - self.clock()
            if wait_s > 0:
                return Wait(wait_s)
        self._last_was_decode = True
        return self._step(first, group[:self.max_batch])

    def _step(self, key: PieceKey, group: list[Job]) -> Step:
        now = self.clock()
        for job in group:
            if job.started is None:
                job.started = now
        return Step(key, tuple(StepRow(job=j.id, slot=j.slot, begin=j.done_upto, end=j.chunk_end,
                                       past_len=j.past_len + j.done_upto, first_piece=j.piece == 0,
                                       last_piece=j.piece == len(j.pieces) - 1) for j in group))

    def update(self, step: Step, output: StepOutput) -> tuple[list[Job], list[tuple[Job, Exception]]]:
        """Read a step's output back: count its time, move its jobs on. Returns the jobs that
        finished (their Result is due) and those that failed, with their errors."""
        seconds = output.seconds
        start, end, _ = step.key
        self.compute_seconds += seconds
        self.runs += 1
        self._recent.append((self.clock(), seconds))
        self.unit_seconds[start:end] += seconds / (end - start)
        by_id = {j.id: j for j in self.jobs}
        group = [by_id[row.job] for row in step.rows if row.job in by_id]
        # Running costs that size prompt chunks (per piece, so piece lengths average out).
        chunk_len = step.rows[0].end - step.rows[0].begin
        if chunk_len == 1:
            self._decode_piece_s = _ewma(self._decode_piece_s, seconds)
            self._last_decode_at = self.clock()
        else:
            self._prompt_token_s = _ewma(self._prompt_token_s, seconds / chunk_len)
        failed = [(job, output.failed[job.id]) for job in group if job.id in output.failed]
        finished = []
        for job in group:
            job.compute_s += seconds  # the job waited for the whole run, whatever its share
            if job.id in output.failed:
                self.jobs.remove(job)
            elif self._advance(job):
                finished.append(job)
        return finished, failed

    def _advance(self, job: Job) -> bool:
        """Move the job past the piece it ran; True when its whole input went through."""
        job.piece += 1
        if job.piece < len(job.pieces):
            return False
        job.done_upto = job.chunk_end
        if job.done_upto < job.n_tokens:
            job.piece = 0
            job.chunk_end = self._chunk_end(job)
            return False
        self.jobs.remove(job)
        return True

    def timing(self, job: Job) -> RunTiming:
        """A finished job's split of its time in the engine. Everything that was not a run it took
        part in is queueing: waiting for its first piece and for other pieces between its own. The
        client subtracts both from a request's wall time to estimate the network's share."""
        in_engine_ms = (self.clock() - job.enqueued) * 1e3
        return RunTiming(queue_ms=max(0.0, in_engine_ms - job.compute_s * 1e3), compute_ms=job.compute_s * 1e3)

    # ------------------------------------------------------------------ load figures

    def utilisation(self, window_s: float = 10.0) -> float:
        """Fraction of the last ``window_s`` seconds the engine spent computing."""
        cutoff = self.clock() - window_s
        busy = sum(seconds for finished, seconds in list(self._recent) if finished >= cutoff)
        return min(busy / window_s, 1.0)

    def load_factor(self) -> float:
        """How much longer a run takes end to end on this server now: 1 / (1 - utilisation), the
        M/M/1 stretch of response time, capped at 10 (utilisation counted up to 0.9)."""
        return 1.0 / (1.0 - min(self.utilisation(), 0.9))

    def _active(self) -> list[tuple[int, int, int]]:
        """(slot, start, end) of the open sessions that ran on this server in the last ``active_s``."""
        cutoff = self.clock() - self.active_s
        return [(slot, start, end) for slot, (at, start, end) in self._last_range.copy().items()
                if at >= cutoff and slot in self.open_slots]

    def active_sessions(self) -> int:
        """Sessions that ran a step here in the last ``active_s`` seconds: a session that runs every
        unit on its device holds a slot but never joins a batch (the batch window waits for these)."""
        return len(self._active())

    def unit_rows(self, exclude_slot: int | None = None) -> list[int]:
        """Per unit, the active sessions whose latest step ran it here (the asker's own left out):
        the rows a new session's step at that unit would join."""
        rows = [0] * self.num_units
        for slot, start, end in self._active():
            if slot != exclude_slot:
                for unit in range(start, end):
                    rows[unit] += 1
        return rows
