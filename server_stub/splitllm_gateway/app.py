"""An OpenAI-compatible HTTP gateway in front of a split, so existing OpenAI clients can use SplitLLM.

``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (streaming or not) run through :class:`~splitllm.client.SplitClient` s:
the first layers in this process, the rest on the split server; ``GET /metrics`` and
``GET /healthz`` are the gateway's own. Usage, options and limitations: docs/gateway.md; the
command line: ``splitllm_gateway.cli``.

Concurrency contract: a SplitClient holds **one** conversation's KV cache, so a gateway process
owns ``concurrency`` clients (default 1) and a request holds one of them until its last token is
sent; more requests wait up to ``queue_timeout_s``, then get 429 with ``Retry-After``. Each
request is an independent conversation; it takes the idle client whose KV covers the longest
prefix of its prompt, so a conversation's next turn only runs its new tokens. A client connects
on its first request and is rebuilt after its connection is lost. Errors have OpenAI's JSON
shape: 400 bad request, 401 bad gateway API key, 429 no client free in time, 502 the split
server failed, 503 it cannot be reached. Request fields and reply shapes: ``splitllm_gateway.api``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web

from splitllm import Bundle, GenerationStats, errors, get_codec
from splitllm_gateway.api import (
    FINISH,
    GenRequest,
    RequestError,
    Shape,
    bad,
    map_error,
    parse_chat,
    parse_completion,
    usage,
)
from splitllm_gateway.clients import DEFAULT_KEEPALIVE_S, DEFAULT_QUEUE_TIMEOUT_S, Gateway, generate
from splitllm_gateway.metrics import CONTENT_TYPE, generate_latest

__all__ = ["DEFAULT_CODEC", "create_gateway_app", "serve_gateway"]

log = logging.getLogger("splitllm_gateway")

DEFAULT_CODEC = "int8-block64"


# ---------------------------------------------------------------------- HTTP


_GATEWAY = web.AppKey("splitllm_gateway", Gateway)


def _json_error(err: RequestError) -> web.Response:
    headers = dict(err.headers or {})
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(err.body, status=err.status, headers=headers or None)


@web.middleware
async def _edge(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    """Authenticate, turn every failure into OpenAI's error JSON with a fitting status, count."""
    gateway = request.app[_GATEWAY]
    began = time.perf_counter()
    try:
        api_key = gateway.api_key
        if api_key is not None and (request.path.startswith("/v1/") or request.path == "/metrics"):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                raise RequestError(401, "missing API key: send 'Authorization: Bearer KEY'",
                                   code="invalid_api_key", type_="authentication_error")
            if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                raise RequestError(401, "incorrect API key provided", code="invalid_api_key",
                                   type_="authentication_error")
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = "not_found" if exc.status == 404 else None
        response = _json_error(RequestError(exc.status, f"{exc.reason}: {request.method} {request.path}", code=code))
    except Exception as exc:
        response = _json_error(map_error(exc))
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    gateway.metrics.requests.labels(route, str(response.status)).inc()
    gateway.metrics.request_seconds.labels(route).observe(time.perf_counter() - began)
    return response


def _model(gateway: Gateway) -> dict[str, Any]:
    return {"id": gateway.model_name, "object": "model", "created": 0, "owned_by": "splitllm"}


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(request.app[_GATEWAY])]})


async def _model_by_id(request: web.Request) -> web.Response:
    gateway = request.app[_GATEWAY]
    wanted = request.match_info["model"]
    if wanted != gateway.model_name:
        raise RequestError(404, f"The model '{wanted}' does not exist; this gateway serves '{gateway.model_name}'",
                           param="model", code="model_not_found")
    return web.json_response(_model(gateway))


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "model": request.app[_GATEWAY].model_name})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_GATEWAY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _read_json(request: web.Request) -> object:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from exc


def _prompt_ids(gateway: Gateway, req: GenRequest) -> list[int]:
    text = gateway.bundle.text
    if req.messages is not None:
        return text.encode_chat(req.messages)
    if req.prompt_ids is not None:
        return text.check_ids(req.prompt_ids)
    return text.encode(req.prompt or "", add_special_tokens=True)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_chat(await _read_json(request)), "chatcmpl")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, parse_completion(await _read_json(request)), "cmpl")


async def _complete(request: web.Request, req: GenRequest, id_prefix: str) -> web.StreamResponse:
    gateway = request.app[_GATEWAY]
    received = time.perf_counter()
    ids = _prompt_ids(gateway, req)
    shape = Shape(req, {"id": f"{id_prefix}-{secrets.token_hex(12)}", "created": int(time.time()),
                         "model": gateway.model_name, "system_fingerprint": gateway.fingerprint})
    stats_out: list[GenerationStats] = []
    async with gateway.slot(ids) as slot:
        pieces = generate(gateway, slot, ids, req, stats_out)
        async with aclosing(pieces):
            if req.stream:
                response = await _stream(request, gateway, shape, pieces, stats_out, received)
            else:
                texts: list[str] = []
                async for piece in pieces:
                    if not texts:
                        gateway.metrics.ttft_seconds.observe(time.perf_counter() - received)
                    texts.append(piece)
                stats = stats_out[0]
                response = web.json_response(shape.reply("".join(texts), FINISH.get(stats.stop_reason, "stop"),
                                                         usage(stats)))
    if stats_out:
        gateway.metrics.prompt_tokens.inc(stats_out[0].prompt_tokens)
        gateway.metrics.completion_tokens.inc(stats_out[0].new_tokens)
    return response


async def _stream(request: web.Request, gateway: Gateway, shape: Shape, pieces: AsyncIterator[str],
                  stats_out: list[GenerationStats], received: float) -> web.StreamResponse:
    """Server-sent events. The first piece is awaited before the headers go out, so a request that
    fails up front (bad prompt, server down) still gets a proper HTTP status, unless it takes
    longer than ``keepalive_s`` (a long prefill): then the headers go out and a ``: keep-alive``
    comment every ``keepalive_s`` keeps proxies and clients from timing out. A failure after the
    headers is sent as an ``error`` event, which OpenAI clients raise as APIError."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await response.write(f"data: {data}\n\n".encode())

    first_piece = asyncio.ensure_future(anext(pieces, None))
    try:
        while True:
            done, _ = await asyncio.wait({first_piece}, timeout=gateway.keepalive_s)
            if done:
                break
            if not response.prepared:
                await response.prepare(request)
            await response.write(b": keep-alive\n\n")
        if not response.prepared:
            first_piece.result()  # a failure before anything was sent: raised as an HTTP status
            await response.prepare(request)
        first = first_piece.result()
        gateway.metrics.ttft_seconds.observe(time.perf_counter() - received)
        if shape.chat:
            await send(shape.chunk(None))
        if first is not None:
            await send(shape.chunk(first))
            async for text in pieces:
                await send(shape.chunk(text))
        stats = stats_out[0]
        await send(shape.chunk(None if not shape.chat else "", FINISH.get(stats.stop_reason, "stop")))
        if shape.extra:
            await send(shape.usage_chunk(usage(stats)))
        await send("[DONE]")
    except ConnectionResetError:
        log.info("the HTTP client went away mid-stream")
    except Exception as exc:
        if not response.prepared:
            raise
        await send(map_error(exc).body)  # the headers are out: the error can only be an event now
    finally:
        if not first_piece.done():
            first_piece.cancel()
            with contextlib.suppress(BaseException):
                await first_piece
    return response


def create_gateway_app(bundle_path: str | os.PathLike[str] | Bundle, server_url: str, *, token: str | None = None,
                       split: int | None = None, codec: str = DEFAULT_CODEC, model_name: str | None = None,
                       api_key: str | None = None, concurrency: int = 1,
                       queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S,
                       keepalive_s: float = DEFAULT_KEEPALIVE_S) -> web.Application:
    """The gateway app. Opens (and hashes) the bundle and checks the options now; connects later.

    ``token`` authenticates the gateway to the split server; ``api_key`` is what the gateway's own
    callers must send. ``model_name`` defaults to the bundle's model id. ``concurrency`` is how
    many requests run at once, each on its own SplitClient (its own server session, and its own
    KV cache; they share the device layers' ORT session); more requests wait up to
    ``queue_timeout_s`` seconds, then get 429. A stream whose first token takes longer than
    ``keepalive_s`` gets SSE comments at that interval. Raises BundleError or ConfigError for a
    bad bundle, split, codec, concurrency or timeout.
    """
    bundle = bundle_path if isinstance(bundle_path, Bundle) else Bundle.open(bundle_path)
    if split is not None and not 0 <= split <= bundle.num_layers:
        raise errors.ConfigError(f"split must be in 0..{bundle.num_layers}, got {split}")
    get_codec(codec)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise errors.ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
    for name, value in (("queue_timeout_s", queue_timeout_s), ("keepalive_s", keepalive_s)):
        if not value > 0:
            raise errors.ConfigError(f"{name} must be > 0, got {value!r}")
    app = web.Application(middlewares=[_edge])
    app[_GATEWAY] = gateway = Gateway(bundle, server_url, token, split, codec, model_name or bundle.model_id,
                                       api_key or None, concurrency, queue_timeout_s, keepalive_s)

    async def close_client(_: web.Application) -> AsyncIterator[None]:
        yield
        await gateway.close()

    app.cleanup_ctx.append(close_client)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model:.+}", _model_by_id)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    return app


async def serve_gateway(bundle_path: str | os.PathLike[str] | Bundle, server_url: str, *, host: str = "127.0.0.1",
                        port: int = 8000, **options: Any) -> None:
    """Run the gateway until SIGINT/SIGTERM; prints ``listening on http://HOST:PORT`` once bound.

    ``options`` are the keyword options of :func:`create_gateway_app`. Port 0 picks a free port.
    """
    runner = web.AppRunner(create_gateway_app(bundle_path, server_url, **options), handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"listening on http://{f'[{host}]' if ':' in host else host}:{bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
