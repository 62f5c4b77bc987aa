"""Per-client server state: the KV cache of the units the server has run for that client."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from splitllm.errors import TooManySessions
from splitllm.model.runtime import KVCache


@dataclass
class ServerSession:
    session_id: str
    cache: KVCache
    codec: str
    client_name: str
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    tokens: int = 0

    def touch(self) -> None:
        self.last_used = time.monotonic()


class SessionStore:
    """Bounded map of live sessions; idle ones are evicted after ``idle_ttl_s``."""

    def __init__(self, max_sessions: int, idle_ttl_s: float) -> None:
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self._sessions: dict[str, ServerSession] = {}
        self.opened_total = 0
        self.evicted_total = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, make_cache, codec: str, client_name: str) -> ServerSession:  # noqa: ANN001
        self.evict_idle()
        if len(self._sessions) >= self.max_sessions:
            raise TooManySessions(f"the server holds its maximum of {self.max_sessions} sessions; try again later")
        session = ServerSession(secrets.token_hex(16), make_cache(), codec, client_name)
        self._sessions[session.session_id] = session
        self.opened_total += 1
        return session

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def idle(self) -> list[ServerSession]:
        now = time.monotonic()
        return [s for s in self._sessions.values() if now - s.last_used > self.idle_ttl_s]

    def evict_idle(self) -> int:
        stale = self.idle()
        for session in stale:
            self._sessions.pop(session.session_id, None)
        self.evicted_total += len(stale)
        return len(stale)

    def kv_bytes(self) -> int:
        return sum(s.cache.nbytes() for s in self._sessions.values())
