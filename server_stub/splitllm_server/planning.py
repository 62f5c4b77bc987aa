"""POST /v1/plan (and the Plan frame on a session): the server's answer to "which layers should I run?" as a bandwidth policy.

The client sends a :class:`~splitllm.protocol.plan.PlanRequest` (its own per-unit profile, SLA,
codec and measured link); the server adds its own profile (measured once, cached) scaled by its
current load, and returns a :class:`~splitllm.protocol.plan.PlanResponse`: the DP's placements
for ranges of uplink bandwidth, for the prefill and for decode steps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splitllm.errors import ConfigError
from splitllm.model.bundle import Bundle
from splitllm.planner.costs import bandwidth_grid, build_policies
from splitllm.planner.profile import Profile, load_or_measure
from splitllm.protocol import wire
from splitllm.protocol.plan import PlanRequest, PlanResponse
from splitllm_server.costcurve import BatchCurve, load_or_measure_curve
from splitllm_server.state import ServerState

POLICY_VALID_S = 30.0


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number a plan can use")


def _gflops_per_token(bundle: Bundle) -> list[float] | None:
    """Server work per unit and position from the bundle's cost table (GFLOP), if it has one."""
    units = bundle.cost.get("units", [])
    if len(units) != bundle.num_units:
        return None
    return [float(u.get("flops_per_token_decode", 0)) / 1e9 for u in units]


async def server_profile(state: ServerState) -> Profile:
    """Measure (once, on the engine thread) or load this server's per-unit profile."""
    if state.profile is None:
        async with state.profile_lock:
            if state.profile is None:
                threads = state.config.intra_op_threads
                state.profile = await state.engine.call(lambda: load_or_measure(state.bundle, threads=threads,
                                                                                variant=state.engine.executor.variant))
    return state.profile


async def batch_curve(state: ServerState) -> BatchCurve | None:
    """The engine's decode cost curve (measured once, cached), or None when it does not batch."""
    engine = state.engine
    if engine.scheduler.max_batch <= 1 or not engine.executor.pooled:
        return None
    if state.curve is None:
        async with state.profile_lock:
            if state.curve is None:
                threads = state.config.intra_op_threads
                state.curve = await engine.call(lambda: load_or_measure_curve(
                    state.bundle, engine.executor.variant, threads, engine.scheduler.max_batch,
                    engine.executor.options))
    return state.curve


@dataclass(frozen=True)
class ServerCosts:
    """The server's side of a planning problem (milliseconds per unit; work in the DP's units)."""

    prefill_ms: Sequence[float]
    decode_ms: Sequence[float]
    load_factor: float
    decode_work: Sequence[float] | None  # None: the bundle's FLOPs (work_per_token) for decode too
    extra: dict[str, Any]  # reported to the client beside the policy


def server_costs(state: ServerState, server: Profile, curve: BatchCurve | None, prompt_tokens: int,
                 exclude_slot: int | None = None) -> ServerCosts:
    """The server's side of a planning problem: its times per unit and phase, and its work.

    A batching server prices each unit's decode step at the batch it will join there: the rows
    that unit runs now for the other sessions active on it (``Scheduler.unit_rows``; a session that
    runs everything on its device adds none), plus the asker's; as work, the marginal time the
    asker's row adds (``costcurve``), which is the unit's whole batch-1 time where nobody else runs
    it. A prompt runs in chunks alternating with the decode batches, so while others decode it
    takes about twice its own time. Without batching: the measured times stretched by the M/M/1
    load factor, as before.
    """
    scheduler = state.engine.scheduler
    num_units = state.bundle.num_units
    if curve is None:
        return ServerCosts(server.scaled_prefill_ms(prompt_tokens), server.decode_ms, scheduler.load_factor(), None,
                           {"pricing": "load-factor"})
    rows = scheduler.unit_rows(exclude_slot)
    stretch = 2.0 if any(rows) else 1.0
    return ServerCosts(
        prefill_ms=[ms * stretch for ms in server.scaled_prefill_ms(prompt_tokens)],
        decode_ms=[curve.step_ms(u, num_units, rows[u] + 1) for u in range(num_units)],
        load_factor=1.0,
        decode_work=[curve.marginal_ms(u, num_units, rows[u]) for u in range(num_units)],
        extra={"pricing": "batch-marginal", "occupancy": max(rows), "unit_rows": rows},
    )


MAX_PLAN_REQUEST_BYTES = 1024 * 1024  # as the HTTP body limit of POST /v1/plan


async def make_plan(state: ServerState, text: str, slot: int | None = None) -> dict[str, Any]:
    """The plan for the JSON request ``text`` (the body of POST /v1/plan, or a Plan frame's from
    the session in ``slot``, whose own rows are not counted as others'), as the JSON of a
    :class:`PlanResponse`. Raises a SplitLLMError (ConfigError for a bad request)."""
    try:
        body = json.loads(text, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the plan request is not valid JSON: {exc}") from exc
    req = PlanRequest.from_json(body, state.bundle.num_units)
    server = await server_profile(state)
    costs = server_costs(state, server, await batch_curve(state), req.prompt_tokens, slot)
    client = req.client_profile
    policies = await asyncio.get_running_loop().run_in_executor(None, lambda: build_policies(
        client_prefill_ms=client.scaled_prefill_ms(req.prompt_tokens),
        client_decode_ms=client.decode_ms,
        server_prefill_ms=costs.prefill_ms,
        server_decode_ms=costs.decode_ms,
        load_factor=costs.load_factor, hidden_size=state.bundle.shapes.hidden_size,
        prompt_tokens=req.prompt_tokens, codec=req.codec, uplink_bps=req.uplink_bps,
        downlink_bps=req.downlink, rtt_ms=req.rtt_ms, sla=req.sla,
        # A table around the client's measured uplink: 100x either way, so it only has to
        # ask again after a large change.
        grid=bandwidth_grid(req.uplink_bps / 100, req.uplink_bps * 100),
        work_per_token=_gflops_per_token(state.bundle),
        kv_bytes_per_position=state.bundle.shapes.kv_bytes_per_position,
        decode_work=costs.decode_work,
        decode_rtt_ms=req.rtt_ms / req.tokens_per_round_trip,
        algorithm=req.algorithm,
    ))
    state.metrics.plans += 1
    answer = PlanResponse(policies=policies, server_profile=server, load_factor=costs.load_factor,
                          valid_s=POLICY_VALID_S, extra=costs.extra)
    return answer.to_json()


async def plan_frame(state: ServerState, msg: wire.Plan, slot: int | None = None) -> wire.PlanResult:
    """Answer a Plan frame on the session that sent it (the replica that holds its KV)."""
    if len(msg.request) > MAX_PLAN_REQUEST_BYTES:
        raise ConfigError(f"plan request of {len(msg.request)} bytes exceeds {MAX_PLAN_REQUEST_BYTES}")
    try:
        text = msg.request.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the plan request is not UTF-8: {exc}") from exc
    answer = await make_plan(state, text, slot)
    return wire.PlanResult(seq=msg.seq, policy=json.dumps(answer, separators=(",", ":")).encode())
