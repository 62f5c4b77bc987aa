"""Turn measured profiles and a codec into planner problems for one request phase.

Both sides use this: the server to answer POST /v1/plan, the client and benchmarks to reason
about what a placement costs. Units are the planner's layers (embeddings and head included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from splitllm import codec as codecs
from splitllm.errors import ConfigError
from splitllm.planner import SERVER, Layer, Plan, Policy, Problem, dp, make_policy

__all__ = [
    "FRAME_OVERHEAD_BYTES",
    "PhaseSLA",
    "bandwidth_grid",
    "build_policies",
    "build_problem",
    "kv_move_ms",
    "pool_identical",
]

# msgpack field names and framing around a Run/Result payload, measured on real frames.
FRAME_OVERHEAD_BYTES = 160
RESULT_BYTES = 64


@dataclass(frozen=True)
class PhaseSLA:
    """Latency budgets: ``ttft_ms`` for the prefill (time to first token), ``token_ms`` per decode step."""

    ttft_ms: float
    token_ms: float

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "token_ms"):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                raise ConfigError(f"sla.{name} must be a positive number of milliseconds, got {value}")


def bandwidth_grid(lo_bps: float = 64e3, hi_bps: float = 10e9, points: int = 48) -> list[float]:
    """Geometric uplink grid for policies: 64 kbit/s to 10 Gbit/s by default."""
    ratio = (hi_bps / lo_bps) ** (1 / (points - 1))
    return [lo_bps * ratio**i for i in range(points)]


def build_problem(
    *,
    client_ms: Sequence[float],
    server_ms: Sequence[float],
    server_work: Sequence[float],
    hidden_size: int,
    tokens: int,
    codec: str,
    uplink_bps: float,
    downlink_bps: float,
    rtt_ms: float,
    sla_ms: float,
) -> Problem:
    """A planner problem for ``tokens`` new positions (the prompt for prefill, 1 for decode)."""
    n = len(client_ms)
    if not (len(server_ms) == len(server_work) == n):
        raise ConfigError("client and server profiles must cover the same units")
    hidden_bytes = codecs.get_codec(codec).encoded_size((1, tokens, hidden_size)) + FRAME_OVERHEAD_BYTES
    layers = []
    for unit in range(n):
        out = RESULT_BYTES if unit == n - 1 else hidden_bytes
        layers.append(Layer(client_ms=float(client_ms[unit]), server_ms=float(server_ms[unit]),
                            server_work=float(server_work[unit]), out_bytes=float(out), name=f"unit{unit}"))
    return Problem(layers=tuple(layers), input_bytes=float(4 * tokens + FRAME_OVERHEAD_BYTES),
                   uplink_bps=uplink_bps, downlink_bps=downlink_bps, rtt_ms=rtt_ms, sla_ms=sla_ms)


def kv_move_ms(old: Sequence[str], new: Sequence[str], *, positions: int, kv_bytes_per_position: float,
               uplink_bps: float, downlink_bps: float, rtt_ms: float) -> float:
    """How long moving the KV cache from placement ``old`` to ``new`` takes, as the client does it.

    Units 1..n-2 (the decoder layers; the embedding and head hold no KV) that change sides move
    ``positions * kv_bytes_per_position`` bytes each (fp32 keys and values, exact): up to the
    server at ``uplink_bps``, back at ``downlink_bps``. The client pipelines the requests, so the
    whole move costs one round trip plus the transfers (counted one after the other: an upper
    bound when both directions carry some). 0 when nothing moves.
    """
    if len(old) != len(new):
        raise ConfigError(f"placements cover {len(old)} and {len(new)} units")
    nbytes = positions * kv_bytes_per_position + FRAME_OVERHEAD_BYTES
    total, moved = 0.0, False
    for unit in range(1, len(new) - 1):
        if old[unit] != new[unit]:
            total += nbytes * 8000.0 / (uplink_bps if new[unit] == SERVER else downlink_bps)
            moved = True
    return total + rtt_ms if moved else 0.0


def _move_aware_prefill(decode_plans: dict[float, Plan], token_ms: float, positions: int,
                        kv_bytes_per_position: float) -> Callable[[Problem], Plan]:
    """A prefill solver that avoids a KV move the first decode step cannot absorb.

    ``decode_plans`` holds the decode policy's plan at each grid uplink (solved once, for that
    policy). When the prefill's own plan differs, the KV of every layer that changes sides moves
    before the first decode step; if that move plus the step's planned latency exceeds the
    token SLA, the prefill runs the decode placement instead, provided it meets the TTFT SLA
    (no move at all). Otherwise the prefill's own plan stands.
    """

    def solve_prefill(prefill: Problem) -> Plan:
        own = dp(prefill)
        step = decode_plans[prefill.uplink_bps]
        if own.placement == step.placement:
            return own
        move = kv_move_ms(own.placement, step.placement, positions=positions,
                          kv_bytes_per_position=kv_bytes_per_position, uplink_bps=prefill.uplink_bps,
                          downlink_bps=prefill.downlink_bps, rtt_ms=prefill.rtt_ms)
        if step.latency_ms + move <= token_ms:
            return own
        same = Plan.evaluate(prefill, step.placement, own.algorithm)
        return same if same.feasible else own

    return solve_prefill


def pool_identical(times: Sequence[float], work: Sequence[float]) -> list[float]:
    """``times`` with every group of units of equal ``work`` replaced by the group's mean.

    Identical decoder layers measure a little differently from run to run; left alone, that noise
    decides which of them a plan puts where, and can favour a plan with two server ranges whose
    only merit is having drawn faster-measured layers. Pooled, identical layers cost the same
    and the real differences (switches, transfers) decide.
    """
    if len(times) != len(work):
        raise ConfigError(f"{len(times)} unit times for {len(work)} units of work")
    groups: dict[float, list[int]] = {}
    for unit, w in enumerate(work):
        groups.setdefault(float(w), []).append(unit)
    pooled = [float(t) for t in times]
    for units in groups.values():
        mean = sum(pooled[u] for u in units) / len(units)
        for u in units:
            pooled[u] = mean
    return pooled


def build_policies(
    *,
    client_prefill_ms: Sequence[float],
    client_decode_ms: Sequence[float],
    server_prefill_ms: Sequence[float],
    server_decode_ms: Sequence[float],
    load_factor: float,
    hidden_size: int,
    prompt_tokens: int,
    codec: str,
    uplink_bps: float,
    downlink_bps: float,
    rtt_ms: float,
    sla: PhaseSLA,
    grid: Sequence[float] | None = None,
    work_per_token: Sequence[float] | None = None,
    kv_bytes_per_position: float | None = None,
    decode_work: Sequence[float] | None = None,
    decode_rtt_ms: float | None = None,
    algorithm: str = "dp",
) -> dict[str, Policy]:
    """Prefill and decode policies: the DP's placement for each uplink range.

    Server time is the measured time scaled by ``load_factor`` (queueing on a busy server).
    ``decode_work``, when given, is the server work of each unit for one decode step (a batching
    server passes the marginal milliseconds one more client adds at its occupancy); it replaces
    ``work_per_token`` for the decode phase. ``decode_rtt_ms`` (default ``rtt_ms``) is the round
    trip a decode step is charged: less than a round trip when one yields several tokens
    (speculative decoding). ``algorithm`` other than "dp" ("greedy", "all-server", "all-client")
    solves both phases with that baseline on the same problems, to compare policies.
    Server work, the quantity minimised, is ``work_per_token`` (e.g. the bundle's FLOPs per unit)
    times the positions run when given, so identical layers cost the same and measurement noise
    cannot steer the choice between them; otherwise the unscaled measured time. With
    ``work_per_token``, units of equal work also get their mean measured times on each side
    (:func:`pool_identical`).

    With ``kv_bytes_per_position`` (fp32 K and V of one layer for one position) the prefill
    policy accounts for the KV move to the decode placement: where the first decode step could
    not absorb it within the token SLA, the prefill runs the decode placement if that meets the
    TTFT SLA (:func:`kv_move_ms`, ``docs/adaptive.md``).
    """
    grid = list(grid or bandwidth_grid())
    problems = {}
    for phase, client, server, tokens, sla_ms, trip_ms in (
        ("prefill", client_prefill_ms, server_prefill_ms, prompt_tokens, sla.ttft_ms, rtt_ms),
        ("decode", client_decode_ms, server_decode_ms, 1, sla.token_ms,
         rtt_ms if decode_rtt_ms is None else decode_rtt_ms),
    ):
        work = server if work_per_token is None else [w * tokens for w in work_per_token]
        if phase == "decode" and decode_work is not None:
            work = list(decode_work)
        if work_per_token is not None:
            client, server = pool_identical(client, work_per_token), pool_identical(server, work_per_token)
        problems[phase] = build_problem(
            client_ms=client, server_ms=[ms * load_factor for ms in server], server_work=work,
            hidden_size=hidden_size, tokens=tokens, codec=codec, uplink_bps=uplink_bps,
            downlink_bps=downlink_bps, rtt_ms=trip_ms, sla_ms=sla_ms,
        )
    if kv_bytes_per_position is not None and not kv_bytes_per_position >= 0:
        raise ConfigError(f"kv_bytes_per_position must be >= 0, got {kv_bytes_per_position}")
    if algorithm != "dp":
        return {phase: make_policy(problems[phase], grid, algorithm) for phase in ("prefill", "decode")}
    decode_plans: dict[float, Plan] = {}  # grid uplink -> the decode plan there, for the prefill's check

    def solve_decode(problem: Problem) -> Plan:
        decode_plans[problem.uplink_bps] = plan = dp(problem)
        return plan

    decode = make_policy(problems["decode"], grid, solver=solve_decode)
    solver = None
    if kv_bytes_per_position is not None:
        solver = _move_aware_prefill(decode_plans, sla.token_ms, prompt_tokens, kv_bytes_per_position)
    return {"prefill": make_policy(problems["prefill"], grid, solver=solver), "decode": decode}
