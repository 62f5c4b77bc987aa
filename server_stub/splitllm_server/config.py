"""Server settings, with the defaults a single-machine deployment wants.

Every default lives here once: :class:`ServerConfig`'s fields (the CLI reads its defaults from
them), with the ``DEFAULT_*`` constants for the ones the engine takes too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitllm.errors import ConfigError
from splitllm.model.bundle import DEFAULT_VARIANT

DEFAULT_CHUNK_UNITS = 8  # SmolLM2's 32 units: four shared pieces
DEFAULT_MAX_BATCH = 64
DEFAULT_BATCH_WINDOW_MS = 2.0
DEFAULT_PREFILL_CHUNK = 256
DEFAULT_MAX_SESSIONS = 256
DEFAULT_ACTIVE_WINDOW_S = 2.0  # a session stepping within this long is counted in batches and plans


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``create_app`` needs. Sizes in bytes, times in seconds.

    ``token``: when set, every HTTP and WebSocket request needs ``Authorization: Bearer <token>``.
    ``segment_cache``: how many ranges' sessions stay loaded (each session holds its layers' weights).
    ``chunk_units``: ranges are cut at multiples of this many units, so clients at different
    splits share the sessions (and weights) of their common tail; 0 = one session per range.
    ``max_batch``: decode steps of different sessions run as one batch per piece, up to this many
    rows (1: one session's step at a time). ``batch_window_ms``: how long a step may wait for other
    sessions' steps to join its batch. ``active_window_s``: a session whose latest step here is
    older than this is not waited for by the batch window nor counted in the rows ``/v1/plan``
    prices a unit at. ``prefill_chunk``: a prompt runs in chunks of at most this
    many positions, interleaved with the decode batches.
    ``intra_op_threads``: ORT threads for the server's segments (0 = one per core).
    ``weights``: which of the bundle's weights the server runs: "fp32" (the exact blocks, the
    default) or a device variant the bundle carries ("fp16", "int8", "int4"), which trades the
    exactness of split generation for the variant's speed and memory.
    ``heartbeat_s``: WebSocket ping interval; a connection whose client does not answer a ping
    within half of it is closed.
    Limits, each with its own error code: ``max_frame_bytes`` (frame_too_large; frames over twice
    the limit close the connection), ``max_sessions`` (too_many_sessions), ``max_context``
    (context_too_long), ``max_new_tokens`` decode steps in a row (too_many_tokens),
    ``max_steps_per_s`` requests per connection (rate_limited), ``idle_ttl_s`` (the session is
    closed with a Close frame and its KV freed). ``certfile``/``keyfile`` serve HTTPS and wss.
    Hardening: ``handshake_timeout_s`` closes a WebSocket that has not completed a valid Hello in
    that time (policy-violation close 1008); ``max_conns_per_addr`` caps the open WebSockets of one
    client address (HTTP 429 on the upgrade; 0 = no cap); behind a balancer the address is the
    last hop of ``X-Forwarded-For``, believed only from a peer in ``trusted_proxies``.
    ``drain_timeout_s``: on SIGTERM, how long in-flight steps get before every client is sent
    its Close ("server draining; reconnect") regardless; ``drain_grace_s`` before that, the server
    only reports not ready (and refuses new sessions) while current sessions go on, so a
    balancer's health checks take it out first and clients' reconnects go straight to others.
    ``providers``: ONNX Runtime execution providers in order of preference ("cuda", "openvino",
    ... or full ORT names); unavailable ones are skipped with a warning, CPU is always last.
    """

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_frame_bytes: int = 64 * 1024 * 1024
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_context: int | None = None
    idle_ttl_s: float = 600.0
    max_new_tokens: int = 4096
    max_steps_per_s: float = 1000.0
    warm_splits: tuple[int, ...] | None = None  # suffixes to load at start (default: the SDK's default split)
    certfile: Path | None = None
    keyfile: Path | None = None
    segment_cache: int = 4
    chunk_units: int = DEFAULT_CHUNK_UNITS
    max_batch: int = DEFAULT_MAX_BATCH
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS
    active_window_s: float = DEFAULT_ACTIVE_WINDOW_S
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    intra_op_threads: int = 0
    allow_spinning: bool = True
    verify_bundle: bool = True
    weights: str = DEFAULT_VARIANT
    heartbeat_s: float = 30.0
    server_name: str = "splitllm-server"
    handshake_timeout_s: float = 5.0
    max_conns_per_addr: int = 64
    trusted_proxies: tuple[str, ...] = ()
    drain_timeout_s: float = 30.0
    drain_grace_s: float = 0.0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError("TLS needs both certfile and keyfile")
        if self.max_steps_per_s <= 0:
            raise ConfigError(f"max_steps_per_s must be > 0, got {self.max_steps_per_s}")
        if not self.heartbeat_s > 0:
            raise ConfigError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        if not self.handshake_timeout_s > 0:
            raise ConfigError(f"handshake_timeout_s must be > 0, got {self.handshake_timeout_s}")
        if self.max_conns_per_addr < 0:
            raise ConfigError(f"max_conns_per_addr must be >= 0 (0 = no cap), got {self.max_conns_per_addr}")
        if self.drain_timeout_s < 0 or self.drain_grace_s < 0:
            raise ConfigError(f"drain_timeout_s and drain_grace_s must be >= 0, got {self.drain_timeout_s}, "
                              f"{self.drain_grace_s}")
        for name in ("max_frame_bytes", "max_sessions", "segment_cache", "max_new_tokens", "max_batch", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk_units < 0:
            raise ConfigError(f"chunk_units must be >= 0, got {self.chunk_units}")
        if self.max_frame_bytes < 4096:
            raise ConfigError(f"max_frame_bytes must be >= 4096, got {self.max_frame_bytes}")
        if not self.active_window_s > 0:
            raise ConfigError(f"active_window_s must be > 0, got {self.active_window_s}")
        if not self.batch_window_ms >= 0:
            raise ConfigError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.idle_ttl_s <= 0:
            raise ConfigError(f"idle_ttl_s must be > 0, got {self.idle_ttl_s}")
        if self.token is not None and not self.token:
            raise ConfigError("token must not be empty (leave it unset to disable auth)")
