"""The scheduler alone: its batching decisions, driven through ``cycle`` with a fake executor.

The fake stands at a seam we own (``scheduler.StepExecutor``): it says which pieces are loaded
and "runs" a step by recording it, taking a set time on the test's clock and failing the jobs it
is told to. No ORT, no server: the policy is checked step by step.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import pytest

from splitllm_server.scheduler import (
    Job,
    PieceKey,
    Readiness,
    Scheduler,
    Step,
    StepOutput,
    Wait,
    cycle,
)

UNITS = 6  # embeddings, 4 layers, head
ACTIVE_S = 2.0  # the window a session counts as active in


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeExecutor:
    """Every piece loaded unless listed in ``building`` or ``broken``; a step takes ``step_s``."""

    def __init__(self, clock: Clock, step_s: float = 0.01) -> None:
        self.clock = clock
        self.step_s = step_s
        self.building: set[PieceKey] = set()
        self.broken: set[PieceKey] = set()
        self.fail_jobs: set[int] = set()
        self.steps: list[Step] = []

    def readiness(self, keys: Sequence[PieceKey]) -> Readiness:
        ready = {k for k in keys if k not in self.building and k not in self.broken}
        return Readiness(ready, {k: RuntimeError(f"cannot build {k}") for k in keys if k in self.broken})

    def execute(self, step: Step) -> StepOutput:
        self.steps.append(step)
        self.clock.now += self.step_s
        return StepOutput(self.step_s, {r.job: ValueError(f"job {r.job} is bad") for r in step.rows
                                        if r.job in self.fail_jobs})


def make(max_batch: int = 8, prefill_chunk: int = 64, batch_window_ms: float = 0.0, chunk_units: int = 2,
         step_s: float = 0.01) -> tuple[Scheduler, FakeExecutor, Clock]:
    clock = Clock()
    sched = Scheduler(UNITS, chunk_units=chunk_units, max_batch=max_batch, batch_window_ms=batch_window_ms,
                      prefill_chunk=prefill_chunk, max_context=512, active_s=ACTIVE_S, clock=clock)
    return sched, FakeExecutor(clock, step_s), clock


_ids = iter(range(10**6))


def submit(sched: Scheduler, slot: int, start: int = 0, n_tokens: int = 1, past_len: int = 10,
           end: int = UNITS) -> Job:
    sched.open(slot)
    sched.note_range(slot, start, end)
    job = sched.job(next(_ids), slot, start, end, "token", past_len, n_tokens)
    assert sched.fits(job)
    sched.admit(job)
    return job


def test_the_scheduler_module_does_not_import_onnxruntime():
    code = ("import sys, splitllm_server.scheduler; "
            "assert 'onnxruntime' not in sys.modules, 'the scheduler pulled in onnxruntime'; "
            "assert 'splitllm' not in sys.modules, 'the scheduler pulled in the SDK'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_decode_steps_at_one_piece_form_one_batch_up_to_max_batch_earliest_piece_first():
    sched, ex, _ = make(max_batch=2)
    early = submit(sched, 0, start=0)  # pieces (0,2) (2,4) (4,6)
    late = [submit(sched, s, start=2) for s in (1, 2)]  # pieces (2,4) (4,6)
    turn = cycle(sched, ex)
    assert isinstance(turn.step, Step) and turn.step.key == (0, 2, False)
    assert [r.job for r in turn.step.rows] == [early.id]
    turn = cycle(sched, ex)  # three wait at (2, 4): the batch is capped at two
    assert turn.step.key == (2, 4, False) and [r.job for r in turn.step.rows] == [early.id, late[0].id]
    turn = cycle(sched, ex)  # the earliest piece first: the one left behind at (2, 4)
    assert turn.step.key == (2, 4, False) and [r.job for r in turn.step.rows] == [late[1].id]
    turn = cycle(sched, ex)
    assert turn.step.key == (4, 6, True) and len(turn.step.rows) == 2 and turn.finished == [early, late[0]]
    assert turn.step.rows[0].last_piece and turn.step.rows[0].past_len == 10
    turn = cycle(sched, ex)
    assert turn.finished == [late[1]] and not sched.jobs


def test_prompt_chunks_alternate_with_decode_batches_and_are_sized_by_the_measured_costs():
    sched, ex, clock = make(prefill_chunk=64, chunk_units=0)  # one piece per range
    prompt = submit(sched, 0, n_tokens=200)
    assert prompt.chunk_len == 64  # alone: prefill_chunk positions
    decoders = [submit(sched, s) for s in (1, 2, 3)]
    kinds = []
    for _ in range(4):
        turn = cycle(sched, ex)
        kinds.append("prompt" if turn.step.rows[0].end - turn.step.rows[0].begin > 1 else "decode")
        if kinds[-1] == "decode":
            assert {r.job for r in turn.step.rows} == {j.id for j in decoders}
            decoders = [submit(sched, s) for s in (1, 2, 3)]  # the clients send their next steps
        elif prompt.done_upto == 64:
            # Costs measured (a decode piece 10 ms, a prompt position 10 ms / 64): the next chunk
            # costs half a decode piece.
            assert prompt.chunk_len == 32
    assert kinds == ["decode", "prompt", "decode", "prompt"]
    # The per-position cost is a running average: 0.8 * 10/64 ms + 0.2 * 10/32 ms.
    assert prompt.done_upto == 96 and prompt.chunk_len == int(0.5 * 0.01 / (0.8 * 0.01 / 64 + 0.2 * 0.01 / 32))
    # Nobody decoding any more (their last batch over a second ago): prefill_chunk again.
    for slot in (1, 2, 3):
        sched.close(slot)
    clock.now += 5
    cycle(sched, ex)
    assert prompt.done_upto == 122 and prompt.chunk_len == 64
    while prompt in sched.jobs:
        cycle(sched, ex)
    assert prompt.done_upto == 200


def test_a_prompt_joining_decoders_before_any_cost_is_measured_takes_a_row_per_decoder():
    sched, _, _ = make(prefill_chunk=64)
    for s in range(12):
        submit(sched, s)
    assert submit(sched, 99, n_tokens=100).chunk_len == 12
    sched2, _, _ = make(prefill_chunk=64)
    submit(sched2, 0)
    assert submit(sched2, 99, n_tokens=100).chunk_len == 8  # at least 8 positions


def test_a_failed_job_fails_alone_and_the_rest_of_its_batch_moves_on():
    sched, ex, _ = make(chunk_units=0)
    jobs = [submit(sched, s) for s in range(3)]
    ex.fail_jobs = {jobs[1].id}
    turn = cycle(sched, ex)
    assert [j for j, _ in turn.failed] == [jobs[1]] and isinstance(turn.failed[0][1], ValueError)
    assert turn.finished == [jobs[0], jobs[2]] and not sched.jobs


def test_a_piece_that_fails_to_build_fails_its_jobs_and_one_being_built_waits():
    sched, ex, _ = make()
    a, b = submit(sched, 0, start=0), submit(sched, 1, start=2)
    ex.broken = {(0, 2, False)}
    ex.building = {(2, 4, False)}
    turn = cycle(sched, ex)
    assert [j for j, _ in turn.failed] == [a] and turn.step == Wait(None)
    ex.building.clear()
    turn = cycle(sched, ex)
    assert [r.job for r in turn.step.rows] == [b.id]


def test_closing_a_session_drops_its_queued_jobs():
    sched, ex, _ = make()
    mine = [submit(sched, 0), submit(sched, 0, start=2)]
    other = submit(sched, 1)
    assert sched.close(0) == mine
    assert sched.jobs == [other] and 0 not in sched.open_slots
    while sched.jobs:
        assert all(r.job == other.id for r in cycle(sched, ex).step.rows)


def test_a_step_waits_up_to_the_batch_window_for_the_active_sessions_steps():
    sched, ex, clock = make(batch_window_ms=20)
    for s in (1, 2):  # active here (a step in the last ACTIVE_S seconds), their next steps not in yet
        sched.open(s)
        sched.note_range(s, 0, UNITS)
    job = submit(sched, 0)
    turn = cycle(sched, ex)
    assert turn.step == Wait(pytest.approx(0.02)) and not ex.steps
    clock.now += 0.02
    assert [r.job for r in cycle(sched, ex).step.rows] == [job.id]  # the window is over


def test_unit_rows_and_active_sessions_count_the_sessions_that_ran_here_lately():
    sched, _, clock = make()
    sched.open(0), sched.open(1), sched.open(2), sched.open(3)
    sched.note_range(0, 0, UNITS)
    sched.note_range(1, 2, UNITS)
    sched.note_range(2, 4, UNITS)  # slot 3 runs everything on its device: never here
    assert sched.active_sessions() == 3
    assert sched.unit_rows() == [1, 1, 2, 2, 3, 3]
    assert sched.unit_rows(exclude_slot=1) == [1, 1, 1, 1, 2, 2]
    sched.close(2)
    assert sched.unit_rows() == [1, 1, 2, 2, 2, 2]
    clock.now += ACTIVE_S + 0.1
    assert sched.active_sessions() == 0 and sched.unit_rows() == [0] * UNITS


def test_utilisation_and_load_factor_follow_the_steps_run():
    sched, ex, clock = make(step_s=1.0, chunk_units=0)
    assert sched.utilisation() == 0.0 and sched.load_factor() == 1.0
    submit(sched, 0)
    cycle(sched, ex)
    assert sched.utilisation() == pytest.approx(0.1) and sched.load_factor() == pytest.approx(1 / 0.9)
    assert sched.runs == 1 and sched.compute_seconds == 1.0 and sched.unit_seconds.sum() == pytest.approx(1.0)
    clock.now += 11
    assert sched.utilisation() == 0.0


def test_a_run_beyond_the_context_does_not_fit():
    sched, _, _ = make()
    assert not sched.fits(sched.job(1, 0, 0, UNITS, "token", past_len=500, n_tokens=13))
    assert sched.fits(sched.job(2, 0, 0, UNITS, "token", past_len=500, n_tokens=12))
