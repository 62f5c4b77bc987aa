"""What the server keeps for its lifetime, behind one AppKey: bundle, engine, sessions, metrics."""

from __future__ import annotations

import asyncio
import resource
from collections import Counter
from dataclasses import dataclass, field

from splitllm.model.bundle import Bundle
from splitllm.planner.profile import Profile
from splitllm_server.config import ServerConfig
from splitllm_server.engine import Engine
from splitllm_server.sessions import SessionStore


@dataclass
class Metrics:
    bytes_in: int = 0
    bytes_out: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    plans: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def count_error(self, code: str) -> None:
        self.errors[code] += 1


@dataclass
class ServerState:
    config: ServerConfig
    bundle: Bundle
    engine: Engine
    sessions: SessionStore
    metrics: Metrics = field(default_factory=Metrics)
    profile: Profile | None = None  # this server's per-unit timings, measured on first use
    profile_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Readiness (GET /readyz): warm once the default split's segments and the planner kernel are
    # loaded; draining from SIGTERM until exit. Ready = warm and not draining.
    warm: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.warm and not self.draining

    @property
    def max_context(self) -> int:
        model_max = self.bundle.shapes.max_context
        return min(model_max, self.config.max_context) if self.config.max_context else model_max

    def prometheus(self) -> str:
        """The /metrics body in Prometheus text format."""
        m, s, e = self.metrics, self.sessions, self.engine
        lines = [
            "# HELP splitllm_sessions_active Sessions currently connected.",
            "# TYPE splitllm_sessions_active gauge",
            f"splitllm_sessions_active {len(s)}",
            "# TYPE splitllm_sessions_opened_total counter",
            f"splitllm_sessions_opened_total {s.opened_total}",
            "# TYPE splitllm_sessions_evicted_total counter",
            f"splitllm_sessions_evicted_total {s.evicted_total}",
            "# HELP splitllm_kv_bytes Bytes of KV cache held for all sessions.",
            "# TYPE splitllm_kv_bytes gauge",
            f"splitllm_kv_bytes {s.kv_bytes()}",
            "# TYPE splitllm_tokens_in_total counter",
            f"splitllm_tokens_in_total {m.tokens_in}",
            "# TYPE splitllm_tokens_generated_total counter",
            f"splitllm_tokens_generated_total {m.tokens_out}",
            "# TYPE splitllm_bytes_in_total counter",
            f"splitllm_bytes_in_total {m.bytes_in}",
            "# TYPE splitllm_bytes_out_total counter",
            f"splitllm_bytes_out_total {m.bytes_out}",
            "# HELP splitllm_compute_seconds_total Seconds spent running segments.",
            "# TYPE splitllm_compute_seconds_total counter",
            f"splitllm_compute_seconds_total {e.compute_seconds:.6f}",
            "# TYPE splitllm_plans_total counter",
            f"splitllm_plans_total {m.plans}",
            "# HELP splitllm_load_factor Response-time stretch from the last 10 s of compute.",
            "# TYPE splitllm_load_factor gauge",
            f"splitllm_load_factor {e.load_factor():.4f}",
            "# TYPE splitllm_runs_total counter",
            f"splitllm_runs_total {e.runs}",
            "# HELP splitllm_unit_seconds_total Compute seconds attributed to each unit (0 embed, L+1 head).",
            "# TYPE splitllm_unit_seconds_total counter",
        ]
        lines += [f'splitllm_unit_seconds_total{{unit="{u}"}} {sec:.6f}' for u, sec in enumerate(e.unit_seconds)]
        lines += ["# TYPE splitllm_errors_total counter"]
        lines += [f'splitllm_errors_total{{code="{code}"}} {n}' for code, n in sorted(m.errors.items())]
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lines += ["# TYPE splitllm_peak_rss_bytes gauge", f"splitllm_peak_rss_bytes {rss_kib * 1024}"]
        return "\n".join(lines) + "\n"
