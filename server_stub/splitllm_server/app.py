"""The aiohttp application: create_app(config) builds it, the CLI or a test runs it.

Routes: ``GET /healthz`` (liveness, no token needed; details only with the token or when the
server has none), ``GET /readyz`` (no token; 503 until warm-up has finished and while
draining), and, behind the bearer token, ``GET /metrics``, ``GET /v1/manifest``,
``POST /v1/plan`` and the WebSocket ``GET /v1/session``. :func:`drain` is what SIGTERM runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from splitllm import planner
from splitllm.errors import SplitLLMError
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import RuntimeOptions, resolve_providers
from splitllm_server.config import ServerConfig
from splitllm_server.engine import Engine
from splitllm_server.handler import DRAIN_CLOSE_CODE, DRAIN_REASON, Connection
from splitllm_server.metrics import CONTENT_TYPE
from splitllm_server.planning import make_plan
from splitllm_server.sessions import SessionStore
from splitllm_server.state import STATE, ServerState

CONNECTIONS: web.AppKey[Any] = web.AppKey("splitllm_connections")  # set[Connection]
PER_ADDRESS = web.AppKey("splitllm_per_address", Counter)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes of balancers and orchestrators: no token

log = logging.getLogger("splitllm.server")


def _bearer_ok(request: web.Request, token: str | None) -> bool:
    if token is None:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@web.middleware
async def _auth(request: web.Request, handler):  # noqa: ANN001, ANN202
    state = request.app[STATE]
    if request.path == "/v1/session" or request.path in OPEN_PATHS:
        return await handler(request)  # the WebSocket may also authenticate in its Hello frame
    if not _bearer_ok(request, state.config.token):
        state.metrics.count_error("unauthorized")
        raise web.HTTPUnauthorized(text='{"error": "unauthorized"}', content_type="application/json",
                                   headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the process serves HTTP. Without the token (when one is set) the
    answer says only that; with it, what runs: model, weights, sessions, planner kernel."""
    state = request.app[STATE]
    brief = {"status": "ok", "ready": state.ready, "draining": state.draining}
    if not _bearer_ok(request, state.config.token):
        return web.json_response(brief)
    return web.json_response({**brief, "model": state.bundle.model_id, "weights": state.engine.executor.variant,
                              "sessions": len(state.sessions), "planner_kernel": planner.kernel_status(),
                              "chunk_units": state.engine.executor.chunk_units,
                              "providers_requested": list(state.config.providers), "providers": state.providers,
                              "session_providers": _session_providers(state)})


def _session_providers(state: ServerState) -> list[str]:
    """The providers the loaded ORT sessions report (ORT's own word on what runs)."""
    seen: dict[str, None] = {}
    for piece in state.engine.executor.piece_cache.loaded():
        for name in piece.session.get_providers():
            seen.setdefault(name, None)
    return list(seen)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 once warm-up has finished, 503 before and while draining (a balancer
    sends new sessions elsewhere)."""
    state = request.app[STATE]
    if state.ready:
        return web.json_response({"status": "ready"})
    status = "draining" if state.draining else "warming up"
    return web.json_response({"status": status}, status=503, headers={"Retry-After": "1"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def plan_route(request: web.Request) -> web.Response:
    """POST /v1/plan (a client behind a balancer should send the Plan frame on its session instead)."""
    state = request.app[STATE]
    try:
        answer = await make_plan(state, await request.text())
    except SplitLLMError as exc:
        state.metrics.count_error(exc.code)
        return web.json_response({"error": {"code": exc.code, "message": str(exc)}}, status=400)
    return web.json_response(answer)


async def manifest(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"bundle_id": state.bundle.bundle_id, "weights": state.engine.executor.variant,
                              "manifest": state.bundle.manifest})


def client_address(request: web.Request, trusted_proxies: tuple[str, ...]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the last hop its
    ``X-Forwarded-For`` names (the one the proxy itself appended)."""
    peer = request.remote or "unknown"
    forwarded = request.headers.get("X-Forwarded-For", "")
    if peer in trusted_proxies and forwarded.strip():
        return forwarded.split(",")[-1].strip() or peer
    return peer


def _refuse(state: ServerState, status: type[web.HTTPException], code: str, message: str) -> web.HTTPException:
    state.metrics.count_error(code)
    return status(text=f'{{"error": {{"code": "{code}", "message": "{message}"}}}}',
                  content_type="application/json", headers={"Retry-After": "1"})


async def session_ws(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    header_ok = _bearer_ok(request, state.config.token)
    if state.config.token is not None and "Authorization" in request.headers and not header_ok:
        state.metrics.count_error("unauthorized")
        raise web.HTTPUnauthorized(text='{"error": "unauthorized"}', content_type="application/json")
    if state.draining:
        raise _refuse(state, web.HTTPServiceUnavailable, "draining", "server draining; connect to another replica")
    address = client_address(request, state.config.trusted_proxies)
    per_address = request.app[PER_ADDRESS]
    cap = state.config.max_conns_per_addr
    if cap and per_address[address] >= cap:
        raise _refuse(state, web.HTTPTooManyRequests, "too_many_connections",
                      f"{address} already holds {cap} open connections (max_conns_per_addr)")
    # Frames up to twice the limit arrive and get a frame_too_large error; larger ones make
    # aiohttp close the connection (1009) without buffering them.
    # No permessage-deflate: payloads are quantised activations that deflate shrinks by a few
    # percent for a lot of CPU (a 2,000-position fp32 prompt: 7% smaller, 184 ms to compress and
    # 40 ms to inflate, the latter on this event loop; docs/protocol.md), and it would let a
    # small frame inflate to a large one.
    ws = web.WebSocketResponse(max_msg_size=2 * state.config.max_frame_bytes, heartbeat=state.config.heartbeat_s,
                               compress=False)
    per_address[address] += 1
    conn = Connection(state, ws, header_token_ok=header_ok and state.config.token is not None)
    try:
        await ws.prepare(request)
        request.app[CONNECTIONS].add(conn)
        await conn.serve()
    finally:
        request.app[CONNECTIONS].discard(conn)
        per_address[address] -= 1
        if per_address[address] <= 0:
            del per_address[address]
    return ws


async def drain(app: web.Application, timeout_s: float | None = None, grace_s: float | None = None,
                stop_listening: Callable[[], Awaitable[None]] | None = None) -> int:
    """Graceful stop (SIGTERM): mark the server not ready (/readyz 503) and refuse new sessions;
    wait ``grace_s`` (default: the config's ``drain_grace_s``) so a balancer's health checks see
    it while current sessions carry on; call ``stop_listening`` (the CLI closes its listener);
    then let each connection finish the frame it is handling and send it a Close ("server
    draining; reconnect", WebSocket code 1012). After ``timeout_s`` (default: the config's
    ``drain_timeout_s``) the rest are closed regardless. Returns how many connections were told.
    The caller runs the app's cleanup after."""
    state = app[STATE]
    state.draining = True
    timeout_s = state.config.drain_timeout_s if timeout_s is None else timeout_s
    grace_s = state.config.drain_grace_s if grace_s is None else grace_s
    if grace_s > 0:
        await asyncio.sleep(grace_s)
    if stop_listening is not None:
        await stop_listening()
    state.closing = True
    deadline = time.monotonic() + timeout_s
    told = 0
    while app[CONNECTIONS]:
        idle = [conn for conn in app[CONNECTIONS] if not conn.busy]
        late = time.monotonic() >= deadline
        closing = list(app[CONNECTIONS]) if late else idle
        for conn in closing:
            app[CONNECTIONS].discard(conn)  # a busy one closes itself after its frame
        # All at once: each close waits for its client's closing handshake.
        await asyncio.gather(*(conn.close(DRAIN_REASON, DRAIN_CLOSE_CODE) for conn in closing))
        told += len(closing)
        if late:
            break
        await asyncio.sleep(0.02)
    log.info("drained: %d connections told to reconnect", told)
    return told


async def _warm(state: ServerState, splits: tuple[int, ...]) -> None:
    """Load the default split's segments, then mark the server ready (/readyz 200), then load the
    planner's compiled kernel so the first /v1/plan does not wait for numba. Readiness does not
    wait for the kernel: sessions do not need it, and its first compile can take a minute."""
    engine, bundle = state.engine, state.bundle
    try:
        for split in splits:
            if 0 <= split <= bundle.num_layers:
                start, end = bundle.split_range(split, "server")
                await engine.warm_up(start, end)
    except Exception:  # sessions load on first use anyway: serve, slower at first
        log.exception("warm-up failed; segments will load on first use")
    state.warm = True
    await asyncio.get_running_loop().run_in_executor(None, planner.load_kernel)


async def _reap_idle(app: web.Application) -> None:
    """Close connections whose session has been idle longer than the TTL (their KV is freed)."""
    state = app[STATE]
    period = min(max(state.config.idle_ttl_s / 4, 0.05), 5.0)
    while True:
        await asyncio.sleep(period)
        idle = {s.session_id for s in state.sessions.idle()}
        if not idle:
            continue
        for conn in list(app[CONNECTIONS]):
            if conn.session is not None and conn.session.session_id in idle:
                await conn.close(f"session idle for more than {state.config.idle_ttl_s:g} s")
                state.sessions.evicted_total += 1
        state.sessions.evict_idle()  # any left without a connection


def create_app(config: ServerConfig) -> web.Application:
    """The server application; the bundle and ORT sessions open in its startup context."""
    app = web.Application(middlewares=[_auth], client_max_size=1024 * 1024)
    app[CONNECTIONS] = set()
    app[PER_ADDRESS] = Counter()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        bundle = Bundle.open(config.bundle, verify=config.verify_bundle)
        options = RuntimeOptions(intra_op_threads=config.intra_op_threads, allow_spinning=config.allow_spinning,
                                 providers=config.providers)
        providers = resolve_providers(config.providers)  # warns once about any that is missing
        engine = Engine(bundle, cache_size=config.segment_cache, options=options, variant=config.weights,
                        chunk_units=config.chunk_units, max_batch=config.max_batch,
                        batch_window_ms=config.batch_window_ms, prefill_chunk=config.prefill_chunk,
                        max_sessions=config.max_sessions, max_context=config.max_context,
                        active_window_s=config.active_window_s)
        sessions = SessionStore(config.max_sessions, config.idle_ttl_s,
                                on_close=lambda session: engine.close_session(session.slot))
        app[STATE] = state = ServerState(config, bundle, engine, sessions, providers=providers)
        engine.observe(lambda name, value: state.metrics.observe_batch(int(value)) if name == "batch_rows" else None)
        reaper = asyncio.create_task(_reap_idle(app))
        # Load the suffix of the split clients use by default before the first one asks, so
        # its first token does not wait for a session to be built.
        splits = config.warm_splits if config.warm_splits is not None else (bundle.num_layers // 3,)
        warm = asyncio.create_task(_warm(state, splits))
        yield
        warm.cancel()
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        engine.close()

    async def close_sockets(app: web.Application) -> None:
        for conn in list(app[CONNECTIONS]):
            await conn.close("server shutting down")

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/manifest", manifest)
    app.router.add_get("/v1/session", session_ws)
    app.router.add_post("/v1/plan", plan_route)
    return app
