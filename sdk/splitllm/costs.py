"""Turn measured profiles and a codec into planner problems for one request phase.

Both sides use this: the server to answer POST /v1/plan, the client and benchmarks to reason
about what a placement costs. Units are the planner's layers (embeddings and head included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from splitllm import codec as codecs
from splitllm.errors import ConfigError
from splitllm.planner import Layer, Policy, Problem, make_policy

__all__ = ["FRAME_OVERHEAD_BYTES", "PhaseSLA", "bandwidth_grid", "build_problem", "build_policies"]

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
) -> dict[str, Policy]:
    """Prefill and decode policies: the DP's placement for each uplink range.

    Server time is the measured time scaled by ``load_factor`` (queueing on a busy server).
    Server work, the quantity minimised, is ``work_per_token`` (e.g. the bundle's FLOPs per unit)
    times the positions run when given, so identical layers cost the same and measurement noise
    cannot steer the choice between them; otherwise the unscaled measured time.
    """
    grid = list(grid or bandwidth_grid())
    policies = {}
    for phase, client, server, tokens, sla_ms in (
        ("prefill", client_prefill_ms, server_prefill_ms, prompt_tokens, sla.ttft_ms),
        ("decode", client_decode_ms, server_decode_ms, 1, sla.token_ms),
    ):
        work = server if work_per_token is None else [w * tokens for w in work_per_token]
        problem = build_problem(
            client_ms=client, server_ms=[ms * load_factor for ms in server], server_work=work,
            hidden_size=hidden_size, tokens=tokens, codec=codec, uplink_bps=uplink_bps,
            downlink_bps=downlink_bps, rtt_ms=rtt_ms, sla_ms=sla_ms,
        )
        policies[phase] = make_policy(problem, grid)
    return policies
