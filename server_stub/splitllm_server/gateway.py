"""An OpenAI-compatible HTTP gateway in front of a split, so existing OpenAI clients can use SplitLLM.

``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (streaming or not) run through :class:`~splitllm.client.SplitClient` s:
the first layers in this process, the rest on the split server; ``GET /metrics`` and
``GET /healthz`` are the gateway's own. Usage, options and limitations: docs/gateway.md.

Concurrency contract: a SplitClient holds **one** conversation's KV cache, so a gateway process
owns ``concurrency`` clients (default 1) and a request holds one of them until its last token is
sent; more requests wait up to ``queue_timeout_s``, then get 429 with ``Retry-After``. Each
request is an independent conversation; it takes the idle client whose KV covers the longest
prefix of its prompt, so a conversation's next turn only runs its new tokens. A client connects
on its first request and is rebuilt after its connection is lost. Errors have OpenAI's JSON
shape: 400 bad request, 401 bad gateway API key, 429 no client free in time, 502 the split
server failed, 503 it cannot be reached. Request fields and reply shapes: gateway_api.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from aiohttp import web

from splitllm import codec as codecs
from splitllm import errors
from splitllm.model.bundle import Bundle
from splitllm_server.gateway_api import (
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
from splitllm_server.gateway_clients import DEFAULT_KEEPALIVE_S, DEFAULT_QUEUE_TIMEOUT_S, Gateway, generate
from splitllm_server.logs import add_logging_args, configure
from splitllm_server.metrics import CONTENT_TYPE, generate_latest

if TYPE_CHECKING:  # the client pulls in onnxruntime; `splitllm info` should not pay for it
    from splitllm.client import GenerationStats

__all__ = ["build_parser", "create_gateway_app", "main", "serve_gateway"]

log = logging.getLogger("splitllm_server.gateway")

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
    codecs.get_codec(codec)
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


def _cmd_serve_openai(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("SPLITLLM_GATEWAY_API_KEY") or None
    token = args.token or os.environ.get("SPLITLLM_TOKEN") or None
    try:
        asyncio.run(serve_gateway(args.bundle, args.server, host=args.host, port=args.port, token=token,
                                  split=args.split, codec=args.codec, model_name=args.model_name,
                                  api_key=api_key, concurrency=args.concurrency,
                                  queue_timeout_s=args.queue_timeout, keepalive_s=args.keepalive))
    except errors.SplitLLMError as exc:
        print(f"splitllm-gateway: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"splitllm-gateway: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``splitllm-gateway`` command line."""
    from splitllm import __version__

    p = argparse.ArgumentParser(prog="splitllm-gateway",
                                description="Serve an OpenAI-compatible API in front of a split server.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--bundle", required=True, help="bundle directory (the same one the server loaded)")
    p.add_argument("--server", required=True, help="split server URL, e.g. http://127.0.0.1:8765")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--split", type=int, default=None, help="layers run here (default: a third of them)")
    p.add_argument("--codec", default=DEFAULT_CODEC, help=f"activation codec (default {DEFAULT_CODEC})")
    p.add_argument("--token", default=None, help="bearer token of the split server (or env SPLITLLM_TOKEN)")
    p.add_argument("--api-key", default=None,
                   help="require this key from callers (or env SPLITLLM_GATEWAY_API_KEY; default: none)")
    p.add_argument("--model-name", default=None, help="model id reported to callers (default: the bundle's)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests served at once, one SplitClient (server session, KV cache) each (default 1)")
    p.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT_S,
                   help="seconds a request waits for a free client before a 429 with Retry-After "
                        f"(default {DEFAULT_QUEUE_TIMEOUT_S:g})")
    p.add_argument("--keepalive", type=float, default=DEFAULT_KEEPALIVE_S,
                   help="seconds between SSE keep-alive comments while a stream waits for its first token "
                        f"(default {DEFAULT_KEEPALIVE_S:g})")
    add_logging_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``splitllm-gateway``: exit code 0 on a clean stop, 1 on a configuration or listen error."""
    args = build_parser().parse_args(argv)
    configure(args.log_level, args.log_format)
    try:
        return _cmd_serve_openai(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
