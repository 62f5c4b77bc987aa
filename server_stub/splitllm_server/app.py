"""The aiohttp application: create_app(config) builds it, the CLI or a test runs it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator

from aiohttp import web

from splitllm import planner
from splitllm.model.bundle import Bundle
from splitllm.model.runtime import RuntimeOptions
from splitllm_server.config import ServerConfig
from splitllm_server.engine import Engine
from splitllm_server.handler import Connection
from splitllm_server.planning import plan_route
from splitllm_server.sessions import SessionStore
from splitllm_server.state import STATE, ServerState

CONNECTIONS = web.AppKey("splitllm_connections", set)


def _bearer_ok(request: web.Request, token: str | None) -> bool:
    if token is None:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@web.middleware
async def _auth(request: web.Request, handler):  # noqa: ANN001, ANN202
    state = request.app[STATE]
    if request.path == "/v1/session":
        return await handler(request)  # the WebSocket may also authenticate in its Hello frame
    if not _bearer_ok(request, state.config.token):
        state.metrics.count_error("unauthorized")
        raise web.HTTPUnauthorized(text='{"error": "unauthorized"}', content_type="application/json",
                                   headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "model": state.bundle.model_id, "weights": state.engine.variant,
                              "sessions": len(state.sessions), "planner_kernel": planner.kernel_status(),
                              "chunk_units": state.engine.chunk_units})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[STATE].prometheus(), content_type="text/plain")


async def manifest(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"bundle_id": state.bundle.bundle_id, "weights": state.engine.variant,
                              "manifest": state.bundle.manifest})


async def session_ws(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    header_ok = _bearer_ok(request, state.config.token)
    if state.config.token is not None and "Authorization" in request.headers and not header_ok:
        state.metrics.count_error("unauthorized")
        raise web.HTTPUnauthorized(text='{"error": "unauthorized"}', content_type="application/json")
    # Frames up to twice the limit arrive and get a frame_too_large error; larger ones make
    # aiohttp close the connection (1009) without buffering them.
    ws = web.WebSocketResponse(max_msg_size=2 * state.config.max_frame_bytes, heartbeat=state.config.heartbeat_s)
    await ws.prepare(request)
    conn = Connection(state, ws, header_token_ok=header_ok and state.config.token is not None)
    request.app[CONNECTIONS].add(conn)
    try:
        await conn.serve()
    finally:
        request.app[CONNECTIONS].discard(conn)
    return ws


async def _warm(engine: Engine, bundle: Bundle, splits: tuple[int, ...]) -> None:
    for split in splits:
        if 0 <= split <= bundle.num_layers:
            start, end = bundle.split_range(split, "server")
            await engine.warm_up(start, end)
    # Then the planner's compiled kernel, so the first /v1/plan does not wait for numba.
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

    async def resources(app: web.Application) -> AsyncIterator[None]:
        bundle = Bundle.open(config.bundle, verify=config.verify_bundle)
        options = RuntimeOptions(intra_op_threads=config.intra_op_threads, allow_spinning=config.allow_spinning)
        engine = Engine(bundle, cache_size=config.segment_cache, options=options, variant=config.weights,
                        chunk_units=config.chunk_units, max_batch=config.max_batch,
                        batch_window_ms=config.batch_window_ms, prefill_chunk=config.prefill_chunk,
                        max_sessions=config.max_sessions, max_context=config.max_context)
        sessions = SessionStore(config.max_sessions, config.idle_ttl_s,
                                on_close=lambda session: engine.close_session(session.slot))
        app[STATE] = ServerState(config, bundle, engine, sessions)
        reaper = asyncio.create_task(_reap_idle(app))
        # Load the suffix of the split clients use by default before the first one asks, so
        # its first token does not wait for a session to be built.
        splits = config.warm_splits if config.warm_splits is not None else (bundle.num_layers // 3,)
        warm = asyncio.create_task(_warm(engine, bundle, splits))
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
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/manifest", manifest)
    app.router.add_get("/v1/session", session_ws)
    app.router.add_post("/v1/plan", plan_route)
    return app
