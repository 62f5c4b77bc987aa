"""Per-client server state: the session's slot in the engine and its KV store."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splitllm.errors import TooManySessions
from splitllm_server.kvpool import SessionKV

__all__ = ["ServerSession", "SessionStore"]


@dataclass
class ServerSession:
    session_id: str
    slot: int  # the session's row in the engine's KV pools
    cache: SessionKV  # the KV of the units the server ran for it
    codec: str
    client_name: str
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    tokens: int = 0

    def touch(self) -> None:
        self.last_used = time.monotonic()


class SessionStore:
    """Bounded map of live sessions; idle ones are evicted after ``idle_ttl_s``.

    ``on_close(session)`` runs once for every session that leaves (closed or evicted): the
    engine frees its slot there.
    """

    def __init__(self, max_sessions: int, idle_ttl_s: float,
                 on_close: Callable[[ServerSession], None] | None = None) -> None:
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self.on_close = on_close
        self._sessions: dict[str, ServerSession] = {}
        self.opened_total = 0
        self.evicted_total = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def check_room(self) -> None:
        """TooManySessions unless another session fits (idle ones are evicted first)."""
        self.evict_idle()
        if len(self._sessions) >= self.max_sessions:
            raise TooManySessions(f"the server holds its maximum of {self.max_sessions} sessions; try again later")

    def open(self, slot: int, cache: SessionKV, codec: str, client_name: str) -> ServerSession:
        session = ServerSession(secrets.token_hex(16), slot, cache, codec, client_name)
        self._sessions[session.session_id] = session
        self.opened_total += 1
        return session

    def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None and self.on_close is not None:
            self.on_close(session)

    def idle(self) -> list[ServerSession]:
        now = time.monotonic()
        return [s for s in self._sessions.values() if now - s.last_used > self.idle_ttl_s]

    def evict_idle(self) -> int:
        stale = self.idle()
        for session in stale:
            self.close(session.session_id)
        self.evicted_total += len(stale)
        return len(stale)

    def kv_bytes(self) -> int:
        return sum(s.cache.nbytes() for s in self._sessions.values())
