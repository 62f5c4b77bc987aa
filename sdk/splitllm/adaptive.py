"""The client's side of adaptive placement: the server's policies and when to ask again."""

from __future__ import annotations

import time

from splitllm.planner import Policy, PolicyRange
from splitllm.planner.costs import PhaseSLA
from splitllm.planner.profile import Profile
from splitllm.protocol.plan import DEFAULT_UPLINK_BPS, PlanRequest
from splitllm.transport import Remote

__all__ = ["UP_MARGIN", "PolicyFollower"]

_MIN_PLANNED_PROMPT = 16  # prompts shorter than this do not get a prefill plan of their own
UP_MARGIN = 0.10  # move up to a higher-bandwidth range only 10% past its lower edge
_ERROR_EWMA = 0.25  # weight of a new decode step in the model-error average
_ERROR_MIN_STEPS = 3  # decode steps measured before the model error may trigger a re-plan
_REPLAN_GAP_S = 1.0  # at most one re-plan for model error in this many seconds
_MIN_PLANNED_SHARE = 0.5  # the token SLA planned for never drops below this share of the real one
_ERROR_SPREADS = 1.0  # plan for the SLA less the mean model error and this many of its deviations


class PolicyFollower:
    """Holds the prefill and decode policies fetched from POST /v1/plan for one SLA.

    A policy is asked for again when it is older than the server said it stays valid, when the
    measured uplink leaves its table, or when a prompt is more than twice as long or short as
    the one it was planned for (prefill cost grows with the prompt).

    Switching is asymmetric. Each range's plan was solved at its lower edge and latency only
    falls as bandwidth rises, so the plan in use keeps meeting its SLA when the uplink climbs
    into a higher range: the follower moves up only once the uplink is :data:`UP_MARGIN` past
    the new range's edge, so an estimate hovering at a boundary does not move KV back and forth.
    It moves down at once, since below its range a plan may miss its SLA.

    The planner's latency model leaves out what a step costs beyond the profiled unit times and
    the link: the client's own work between runs, the server's per-piece run overhead, queueing
    under load. On a 2-core machine it was 7-29 ms per decode step (a fiber client at a 60 ms
    SLA, planned at 59.9 ms, measured 68-72 ms: ``benchmarks/capacity.py``, docs/capacity.md),
    so plans made to the edge of the SLA missed it. The follower therefore measures each decode
    step against the latency its plan predicted (:meth:`observe_decode`), keeps the average
    difference (:attr:`model_error_ms`) and its spread, plans for the token SLA minus the error
    and one spread (a plan right at the edge misses half the time), and asks
    again as soon as the error says the plan in use misses its SLA.
    """

    def __init__(self, sla: PhaseSLA, profile: Profile, algorithm: str = "dp") -> None:
        self.sla = sla
        self.algorithm = algorithm
        self.profile = profile
        self.policies: dict[str, Policy] | None = None
        self._fetched_at = 0.0
        self._valid_s = 30.0
        self._prompt_tokens = 64
        self._in_use: dict[str, PolicyRange] = {}  # per phase: the range whose plan was last given
        self.tokens_per_round_trip = 1.0  # decode tokens one round trip yields (speculation: more)
        self.model_error_ms = 0.0  # measured decode step minus the plan's predicted latency (average)
        self.model_error_sd_ms = 0.0  # its spread from step to step (standard deviation, averaged)
        self._error_steps = 0
        self._replanned_at = 0.0
        self._stale = False
        self._observed: PolicyRange | None = None  # the decode range the last step was measured under

    @property
    def planned_sla(self) -> PhaseSLA:
        """The SLA plans are asked for: the token SLA less the model error's mean and one spread."""
        token_ms = self.sla.token_ms - max(self.model_error_ms + _ERROR_SPREADS * self.model_error_sd_ms, 0.0)
        return PhaseSLA(self.sla.ttft_ms, max(token_ms, _MIN_PLANNED_SHARE * self.sla.token_ms))

    def observe_decode(self, wall_ms: float) -> None:
        """One decode step (one token, no drafts) took ``wall_ms`` end to end under the decode
        plan in use; a re-plan follows when the plan, corrected by the error, misses the SLA."""
        held = self._in_use.get("decode")
        if held is None or not wall_ms >= 0:
            return
        if held is not self._observed:  # the first step of a placement may move KV: not a sample
            self._observed = held
            return
        error = wall_ms - held.plan.latency_ms
        if self._error_steps == 0:
            self.model_error_ms = error
        else:
            deviation = error - self.model_error_ms
            self.model_error_ms += _ERROR_EWMA * deviation
            variance = (1 - _ERROR_EWMA) * (self.model_error_sd_ms ** 2 + _ERROR_EWMA * deviation ** 2)
            self.model_error_sd_ms = variance ** 0.5
        self._error_steps += 1
        if (self._error_steps >= _ERROR_MIN_STEPS
                and held.plan.latency_ms + self.model_error_ms > self.sla.token_ms
                and held.plan.latency_ms > self.planned_sla.token_ms
                and time.monotonic() - self._replanned_at > _REPLAN_GAP_S):
            self._stale = True  # the next placement_for asks again, with the corrected SLA
            self._replanned_at = time.monotonic()

    async def refresh(self, remote: Remote, codec: str, prompt_tokens: int) -> None:
        link = remote.stats
        uplink = link.uplink_bps_ewma or DEFAULT_UPLINK_BPS
        self._stale = False
        answer = await remote.plan(PlanRequest(
            client_profile=self.profile, sla=self.planned_sla, prompt_tokens=max(1, prompt_tokens), codec=codec,
            uplink_bps=uplink, downlink_bps=uplink, rtt_ms=link.rtt_floor_ms,
            tokens_per_round_trip=self.tokens_per_round_trip, algorithm=self.algorithm,
        ))
        self.policies = answer.policies
        self._valid_s = answer.valid_s
        self._fetched_at = time.monotonic()
        self._prompt_tokens = max(1, prompt_tokens)
        self._in_use.clear()

    async def placement_for(self, remote: Remote, codec: str, phase: str, tokens: int) -> tuple[str, ...] | None:
        """The sides the policy gives this phase at the measured uplink (re-planning when needed)."""
        if self.policies is None:
            await self.refresh(remote, codec, tokens if phase == "prefill" else self._prompt_tokens)
        stale = time.monotonic() - self._fetched_at > self._valid_s
        if stale:
            # Decode frames are too small to measure the uplink from: probe before re-planning.
            await remote.probe()
        uplink = remote.stats.uplink_bps_ewma or DEFAULT_UPLINK_BPS
        # A short prefill (a chat turn's few new tokens) costs little whatever the plan: it
        # neither triggers a re-plan nor becomes the length the next plan is made for.
        resized = (phase == "prefill" and tokens >= _MIN_PLANNED_PROMPT
                   and not 0.5 <= tokens / self._prompt_tokens <= 2.0)
        policies = self.policies
        plan = policies[phase].plan_for(uplink) if policies is not None else None
        if stale or resized or self._stale or plan is None or policies is None:
            planned = tokens if phase == "prefill" and tokens >= _MIN_PLANNED_PROMPT else self._prompt_tokens
            await self.refresh(remote, codec, planned)
            policies = self.policies
            if policies is None:
                return None
            plan = policies[phase].plan_for(uplink)
        ranges = policies[phase].ranges
        if plan is None and ranges:  # still outside the new table: use its nearest end
            plan = ranges[-1].plan if uplink >= ranges[-1].hi_bps else ranges[0].plan
        if plan is None:
            return None
        chosen = next(r for r in ranges if r.plan is plan)
        held = self._in_use.get(phase)
        if (held is not None and held in ranges and chosen.lo_bps > held.lo_bps
                and uplink < chosen.lo_bps * (1 + UP_MARGIN)):
            chosen = held  # just above a boundary: keep the plan in use (it still meets its SLA)
        self._in_use[phase] = chosen
        return tuple(chosen.plan.placement)
