"""What the server keeps for its lifetime, behind one AppKey: bundle, engine, sessions, metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from splitllm.model.bundle import Bundle
from splitllm.planner.profile import Profile
from splitllm_server.config import ServerConfig
from splitllm_server.engine import Engine
from splitllm_server.metrics import Metrics
from splitllm_server.sessions import SessionStore


@dataclass
class ServerState:
    config: ServerConfig
    bundle: Bundle
    engine: Engine
    sessions: SessionStore
    metrics: Metrics = field(default_factory=Metrics)
    profile: Profile | None = None  # this server's per-unit timings, measured on first use
    curve: Any = None  # the engine's BatchCurve (costcurve), measured on first use
    profile_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Readiness (GET /readyz): warm once the default split's segments and the planner kernel are
    # loaded; draining from SIGTERM until exit. Ready = warm and not draining.
    warm: bool = False
    draining: bool = False
    closing: bool = False  # drain past its grace period: connections close after their current frame
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])  # resolved at start

    @property
    def ready(self) -> bool:
        return self.warm and not self.draining

    def __post_init__(self) -> None:
        self.metrics.attach(self)

    @property
    def max_context(self) -> int:
        """Positions a session may hold: the model's, or the config's cap below it (the engine's)."""
        return self.engine.max_context


STATE = web.AppKey("splitllm_state", ServerState)
