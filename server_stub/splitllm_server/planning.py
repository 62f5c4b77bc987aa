"""POST /v1/plan (and the Plan frame on a session): the server's answer to "which layers should I run?" as a bandwidth policy.

The client sends its own per-unit profile, its SLA, its codec and its measured link; the server
adds its own profile (measured once, cached) scaled by its current load, and returns the DP's
placements for ranges of uplink bandwidth, for the prefill and for decode steps.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from splitllm import codec as codecs
from splitllm.errors import ConfigError
from splitllm.planner.costs import PhaseSLA, bandwidth_grid, build_policies
from splitllm.planner.profile import Profile, load_or_measure
from splitllm.protocol import wire

POLICY_VALID_S = 30.0
_MAX_PROMPT_TOKENS = 1 << 20


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number a plan can use")


def _number(body: dict[str, Any], key: str, *, positive: bool = True, default: float | None = None) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"plan request field {key!r} must be a number, got {value!r}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or value == float("inf"):
        raise ConfigError(f"plan request field {key!r} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _gflops_per_token(bundle) -> list[float] | None:  # noqa: ANN001 - Bundle
    """Server work per unit and position from the bundle's cost table (GFLOP), if it has one."""
    units = bundle.cost.get("units", [])
    if len(units) != bundle.num_units:
        return None
    return [float(u.get("flops_per_token_decode", 0)) / 1e9 for u in units]


async def server_profile(state) -> Profile:  # noqa: ANN001 - ServerState
    """Measure (once, on the ORT worker) or load this server's per-unit profile."""
    if state.profile is None:
        async with state.profile_lock:
            if state.profile is None:
                threads = state.config.intra_op_threads
                state.profile = await state.engine.call(lambda: load_or_measure(state.bundle, threads=threads,
                                                                                variant=state.engine.variant))
    return state.profile


def parse_request(body: Any, num_units: int) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConfigError("the plan request must be a JSON object")
    profile = Profile.from_dict(body.get("client_profile"), num_units)
    sla = body.get("sla")
    if not isinstance(sla, dict):
        raise ConfigError("plan request field 'sla' must be an object with ttft_ms and token_ms")
    codec = body.get("codec", "int8-block64")
    if not isinstance(codec, str):
        raise ConfigError("plan request field 'codec' must be a string")
    codecs.get_codec(codec)
    prompt_tokens = body.get("prompt_tokens", profile.prefill_tokens)
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or not 1 <= prompt_tokens <= _MAX_PROMPT_TOKENS:
        raise ConfigError(f"plan request field 'prompt_tokens' must be an int in 1..{_MAX_PROMPT_TOKENS}")
    return {
        "profile": profile,
        "sla": PhaseSLA(_number(sla, "ttft_ms"), _number(sla, "token_ms")),
        "codec": codec,
        "prompt_tokens": prompt_tokens,
        "uplink_bps": _number(body, "uplink_bps", default=100e6),
        "downlink_bps": _number(body, "downlink_bps", default=body.get("uplink_bps", 100e6)),
        "rtt_ms": _number(body, "rtt_ms", positive=False, default=1.0),
    }


MAX_PLAN_REQUEST_BYTES = 1024 * 1024  # as the HTTP body limit of POST /v1/plan


async def make_plan(state, text: str) -> dict[str, Any]:  # noqa: ANN001 - ServerState
    """The plan for the JSON request ``text`` (the body of POST /v1/plan, or a Plan frame's).
    Raises a SplitLLMError (ConfigError for a bad request)."""
    try:
        body = json.loads(text, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the plan request is not valid JSON: {exc}") from exc
    req = parse_request(body, state.bundle.num_units)
    server = await server_profile(state)
    load = state.engine.load_factor()
    client: Profile = req["profile"]
    policies = await asyncio.get_running_loop().run_in_executor(None, lambda: build_policies(
        client_prefill_ms=client.scaled_prefill_ms(req["prompt_tokens"]),
        client_decode_ms=client.decode_ms,
        server_prefill_ms=server.scaled_prefill_ms(req["prompt_tokens"]),
        server_decode_ms=server.decode_ms,
        load_factor=load, hidden_size=state.bundle.shapes.hidden_size,
        prompt_tokens=req["prompt_tokens"], codec=req["codec"], uplink_bps=req["uplink_bps"],
        downlink_bps=req["downlink_bps"], rtt_ms=req["rtt_ms"], sla=req["sla"],
        # A table around the client's measured uplink: 100x either way, so it only has to
        # ask again after a large change.
        grid=bandwidth_grid(req["uplink_bps"] / 100, req["uplink_bps"] * 100),
        work_per_token=_gflops_per_token(state.bundle),
        kv_bytes_per_position=state.bundle.shapes.kv_bytes_per_position,
    ))
    state.metrics.plans += 1
    return {
        "policy": {phase: policy.to_dict() for phase, policy in policies.items()},
        "load_factor": load,
        "valid_s": POLICY_VALID_S,
        "server_profile": server.to_dict(),
    }


async def plan_frame(state, msg: wire.Plan) -> wire.PlanResult:  # noqa: ANN001 - ServerState
    """Answer a Plan frame on the session that sent it (the replica that holds its KV)."""
    if len(msg.request) > MAX_PLAN_REQUEST_BYTES:
        raise ConfigError(f"plan request of {len(msg.request)} bytes exceeds {MAX_PLAN_REQUEST_BYTES}")
    try:
        text = msg.request.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the plan request is not UTF-8: {exc}") from exc
    answer = await make_plan(state, text)
    return wire.PlanResult(seq=msg.seq, policy=json.dumps(answer, separators=(",", ":")).encode())
