"""``POST /v1/plan``: the typed request a client sends and the answer a server returns.

Both sides build and read these dataclasses, so the JSON shape, the defaults and the checks live
here once. ``from_json`` validates everything a peer sent (ConfigError for a bad request, which
the server answers with HTTP 400; FrameError for a malformed answer, which the client raises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from splitllm import codec as codecs
from splitllm.errors import ConfigError, FrameError
from splitllm.planner.costs import PhaseSLA
from splitllm.planner.profile import Profile
from splitllm.planner.solve import Policy

__all__ = ["DEFAULT_CODEC", "DEFAULT_UPLINK_BPS", "MAX_PROMPT_TOKENS", "PHASES", "PlanRequest", "PlanResponse"]

DEFAULT_CODEC = "int8-block64"
DEFAULT_UPLINK_BPS = 100e6  # what a client that has measured nothing yet assumes
DEFAULT_RTT_MS = 1.0
DEFAULT_VALID_S = 30.0
MAX_PROMPT_TOKENS = 1 << 20
PHASES = ("prefill", "decode")
PLAN_ALGORITHMS = ("dp", "greedy", "all-server", "all-client")


def _number(body: dict[str, Any], key: str, default: float | None, *, positive: bool = True) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"plan request field {key!r} must be a number, got {value!r}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or not math.isfinite(value):
        raise ConfigError(f"plan request field {key!r} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


@dataclass(frozen=True)
class PlanRequest:
    """What a client asks: its per-unit profile, its SLA, its codec, its prompt length and link.

    ``downlink_bps`` defaults to the uplink (a symmetric link) when None. ``tokens_per_round_trip``:
    how many tokens one decode round trip yields (above 1 with speculative decoding), so the
    server charges each token that share of the round trip. ``algorithm``: the paper's DP, or a
    baseline ("greedy", "all-server", "all-client") solved on the same inputs, to compare them.
    """

    client_profile: Profile
    sla: PhaseSLA
    prompt_tokens: int
    codec: str = DEFAULT_CODEC
    uplink_bps: float = DEFAULT_UPLINK_BPS
    downlink_bps: float | None = None
    rtt_ms: float = DEFAULT_RTT_MS
    tokens_per_round_trip: float = 1.0
    algorithm: str = "dp"

    @property
    def downlink(self) -> float:
        return self.uplink_bps if self.downlink_bps is None else self.downlink_bps

    def to_json(self) -> dict[str, Any]:
        return {
            "client_profile": self.client_profile.to_dict(),
            "sla": {"ttft_ms": self.sla.ttft_ms, "token_ms": self.sla.token_ms},
            "codec": self.codec, "prompt_tokens": self.prompt_tokens,
            "uplink_bps": self.uplink_bps, "downlink_bps": self.downlink, "rtt_ms": self.rtt_ms,
            "tokens_per_round_trip": self.tokens_per_round_trip, "algorithm": self.algorithm,
        }

    @classmethod
    def from_json(cls, body: Any, num_units: int) -> PlanRequest:
        """Validate a request body for a model of ``num_units`` units (ConfigError names the field)."""
        if not isinstance(body, dict):
            raise ConfigError("the plan request must be a JSON object")
        profile = Profile.from_dict(body.get("client_profile"), num_units)
        sla = body.get("sla")
        if not isinstance(sla, dict):
            raise ConfigError("plan request field 'sla' must be an object with ttft_ms and token_ms")
        codec = body.get("codec", DEFAULT_CODEC)
        if not isinstance(codec, str):
            raise ConfigError("plan request field 'codec' must be a string")
        codecs.get_codec(codec)
        prompt_tokens = body.get("prompt_tokens", profile.prefill_tokens)
        if (isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int)
                or not 1 <= prompt_tokens <= MAX_PROMPT_TOKENS):
            raise ConfigError(f"plan request field 'prompt_tokens' must be an int in 1..{MAX_PROMPT_TOKENS}")
        uplink = _number(body, "uplink_bps", DEFAULT_UPLINK_BPS)
        per_trip = _number(body, "tokens_per_round_trip", 1.0)
        algorithm = body.get("algorithm", "dp")
        if algorithm not in PLAN_ALGORITHMS:
            raise ConfigError(f"plan request field 'algorithm' must be one of {', '.join(PLAN_ALGORITHMS)}, "
                              f"got {algorithm!r}")
        if per_trip < 1:
            raise ConfigError(f"plan request field 'tokens_per_round_trip' must be >= 1, got {per_trip}")
        return cls(
            client_profile=profile,
            sla=PhaseSLA(_number(sla, "ttft_ms", None), _number(sla, "token_ms", None)),
            prompt_tokens=prompt_tokens, codec=codec, uplink_bps=uplink,
            downlink_bps=_number(body, "downlink_bps", uplink),
            rtt_ms=_number(body, "rtt_ms", DEFAULT_RTT_MS, positive=False),
            tokens_per_round_trip=per_trip, algorithm=algorithm,
        )


@dataclass(frozen=True)
class PlanResponse:
    """The server's answer: a bandwidth policy per phase, valid for ``valid_s`` seconds.

    ``load_factor`` is how much the server stretched its own times for its current load;
    ``server_profile`` the per-unit times it planned with.
    """

    policies: dict[str, Policy]
    server_profile: Profile
    load_factor: float = 1.0
    valid_s: float = DEFAULT_VALID_S
    extra: dict[str, Any] = field(default_factory=dict)  # informational fields a newer server adds

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": {phase: policy.to_dict() for phase, policy in self.policies.items()},
            "load_factor": self.load_factor,
            "valid_s": self.valid_s,
            "server_profile": self.server_profile.to_dict(),
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Any) -> PlanResponse:
        """Read a server's answer; FrameError when it is malformed."""
        try:
            policies = {phase: Policy.from_dict(data["policy"][phase]) for phase in PHASES}
            valid_s = float(data.get("valid_s", DEFAULT_VALID_S))
            load = float(data.get("load_factor", 1.0))
            profile = Profile.from_dict(data["server_profile"])
            if not (valid_s > 0 and math.isfinite(valid_s)):
                raise ValueError(f"valid_s must be a positive number, got {valid_s}")
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
            raise FrameError(f"the server's plan answer is malformed: {exc!r}") from exc
        known = {"policy", "valid_s", "load_factor", "server_profile"}
        return cls(policies, profile, load, valid_s, {k: v for k, v in data.items() if k not in known})
