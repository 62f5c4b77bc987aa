"""An OpenAI-compatible HTTP gateway in front of a split, so existing OpenAI clients can use SplitLLM.

``GET /v1/models`` and ``POST /v1/chat/completions`` (streaming or not) run through
:class:`~splitllm.client.SplitClient` s: the first layers in this process, the rest on the split
server. Usage, options and limitations: docs/gateway.md.

Concurrency contract: a SplitClient holds **one** conversation's KV cache, so a gateway process
owns ``concurrency`` clients (default 1) and a request holds one of them until its last token is
sent; more requests wait. Each request is an independent conversation; it takes the idle client
whose KV covers the longest prefix of its prompt, so a conversation's next turn only runs its new
tokens. A client connects on its first request and is rebuilt after its connection is lost. Errors have OpenAI's JSON shape: 400 bad request, 401
bad gateway API key, 502 the split server failed, 503 it cannot be reached.
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from splitllm import codec as codecs
from splitllm import errors
from splitllm.model.bundle import Bundle
from splitllm.stream import common_prefix
from splitllm_server.logs import add_logging_args, configure

if TYPE_CHECKING:  # the client pulls in onnxruntime; `splitllm info` should not pay for it
    from splitllm.client import GenerationStats, SplitClient

__all__ = ["build_parser", "create_gateway_app", "main", "serve_gateway"]

log = logging.getLogger("splitllm_server.gateway")

DEFAULT_CODEC = "int8-block64"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MAX_STOP = 4  # OpenAI's limit on stop sequences
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class _RequestError(Exception):
    """An HTTP-level failure of this gateway, rendered as OpenAI's error JSON; never leaves the module."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _map_error(exc: Exception) -> _RequestError:
    """The HTTP status and OpenAI error for any failure of a request (the gateway's edge)."""
    if isinstance(exc, _RequestError):
        return exc
    if not isinstance(exc, errors.SplitLLMError):
        log.error("unexpected failure of a request", exc_info=exc)
        return _RequestError(500, "internal gateway error (see the gateway's log)", type_="server_error")
    if isinstance(exc, errors.ContextTooLong):
        return _RequestError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (errors.ConfigError, errors.GenerationError)):
        return _RequestError(400, str(exc), code=exc.code)
    if isinstance(exc, (errors.ServerUnavailable, errors.LimitExceeded)):
        return _RequestError(503, f"the split server is unavailable: {exc}", code=exc.code, type_="server_error")
    if isinstance(exc, errors.AuthError):
        return _RequestError(502, f"the split server refused the gateway's token: {exc}", code=exc.code,
                             type_="server_error")
    if isinstance(exc, (errors.ServerError, errors.ProtocolError)):
        return _RequestError(502, f"the split server failed: {exc}", code=exc.code, type_="server_error")
    return _RequestError(500, f"the gateway failed: {exc}", code=exc.code, type_="server_error")


# ---------------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class _ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None = None) -> _RequestError:
    return _RequestError(400, message, param=param)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _bad(f"'{key}' must be a number in [{lo:g}, {hi:g}], got {value!r}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, lo: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _bad(f"'{key}' must be an integer >= {lo}, got {value!r}", key)
    return value


def _content_text(content: object, where: str) -> str:
    """A message's text: a string, or the concatenated ``{"type": "text"}`` parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"{where}: only text content parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{where} must be a string or a list of text parts", where)


def _messages(raw: object) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty array", "messages")
    out = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object", where)
        role = message.get("role")
        if role == "tool" or message.get("tool_calls") or message.get("function_call"):
            raise _bad(f"{where}: tool and function calls are not supported by this gateway", where)
        if not isinstance(role, str) or role not in _ROLES:
            raise _bad(f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        text = "" if content is None and role == "assistant" else _content_text(content, f"{where}.content")
        out.append({"role": _ROLES[role], "content": text})
    return out


def _parse_chat(body: object) -> _ChatRequest:
    """Validate a chat completion request body; unsupported features are refused, not ignored."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    messages = _messages(body.get("messages"))
    if (n := _integer(body, "n", 1)) not in (None, 1):
        raise _bad(f"'n' must be 1 (one choice per request), got {n}", "n")
    for key in ("tools", "functions", "logit_bias", "logprobs", "presence_penalty", "frequency_penalty"):
        if body.get(key):  # absent, null, false, 0 and empty all mean "off"
            raise _bad(f"'{key}' is not supported by this gateway", key)
    if body.get("response_format") not in (None, {"type": "text"}):
        raise _bad("only response_format {'type': 'text'} is supported", "response_format")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or len(stops) > _MAX_STOP or not all(isinstance(s, str) for s in stops):
        raise _bad(f"'stop' must be a string or an array of at most {_MAX_STOP} strings", "stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise _bad("'stream_options' is only allowed (as an object) when 'stream' is true", "stream_options")
    max_tokens = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
    seed = _integer(body, "seed", -(2**63))
    return _ChatRequest(
        messages=messages, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default: sampling at 1
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_integer(body, "top_k", 0) or 0,  # an extension (vLLM's), 0 = off
        seed=secrets.randbits(63) if seed is None else seed % 2**63,  # OpenAI seeds are signed int64
        stop=tuple(stops), stream=stream, include_usage=bool((options or {}).get("include_usage")),
    )


# ---------------------------------------------------------------------- the one client


class _Slot:
    """One SplitClient (one server session, one conversation's KV), used by one request at a time."""

    def __init__(self) -> None:
        self.client: SplitClient | None = None

    def shared_prefix(self, ids: list[int]) -> int:
        """How many leading positions of ``ids`` this slot's client already holds the KV of."""
        return common_prefix(self.client.tokens, ids) if self.client is not None else 0


class _Gateway:
    """The app's state: its options and ``concurrency`` SplitClients, each built on first use and
    dropped when broken. A request takes the idle client holding the longest prefix of its
    prompt (a conversation's next turn finds its KV), or waits for one."""

    def __init__(self, bundle: Bundle, server_url: str, token: str | None, split: int | None, codec: str,
                 model_name: str, api_key: str | None, concurrency: int = 1) -> None:
        self.bundle, self.server_url, self.token, self.split, self.codec = bundle, server_url, token, split, codec
        self.model_name, self.api_key = model_name, api_key
        self.fingerprint = f"splitllm-{bundle.bundle_id[:12]}"
        self.slots = [_Slot() for _ in range(concurrency)]
        self._idle = list(self.slots)
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self, ids: list[int]) -> AsyncIterator[_Slot]:
        """Hold the idle slot whose client shares the longest prefix with ``ids`` (waiting for one)."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._idle))
            chosen = max(self._idle, key=lambda slot: slot.shared_prefix(ids))
            self._idle.remove(chosen)
        try:
            yield chosen
        finally:
            async with self._changed:
                self._idle.append(chosen)
                self._changed.notify()

    async def client(self, slot: _Slot) -> SplitClient:
        """The slot's connected client (hold the slot); raises ServerUnavailable if unreachable."""
        if slot.client is None:
            from splitllm.client import SplitClient

            # A gateway answers 503 rather than quietly running the whole model itself, and it
            # gives a lost server only a short grace period before saying so.
            client = SplitClient(self.bundle, self.server_url, token=self.token, split=self.split,
                                 codec=self.codec, client_name="splitllm-gateway",
                                 fallback_local=False, failover_timeout_s=2.0)
            try:
                await client.connect()
            except BaseException:
                await client.close()
                raise
            slot.client = client
        return slot.client

    @staticmethod
    async def discard(slot: _Slot) -> None:
        """Drop the slot's client so its next request reconnects with empty caches on both sides."""
        client, slot.client = slot.client, None
        if client is not None:
            await client.close()

    async def close(self) -> None:
        for slot in self.slots:
            await self.discard(slot)


async def _generate(gateway: _Gateway, req: _ChatRequest, stats_out: list[GenerationStats]) -> AsyncIterator[str]:
    """Stream the reply's text, holding one of the gateway's clients until closed; appends the stats when done.

    A reused connection found lost before any text was yielded is retried once on a fresh client.
    Any failure that is not the request's own fault drops the client, since a half-finished
    exchange may leave the WebSocket or the server session out of step with the client.
    """
    ids = gateway.bundle.text.encode_chat(req.messages)
    async with gateway.slot(ids) as slot:
        for attempt in range(2):
            sent, reused = False, slot.client is not None
            try:
                client = await gateway.client(slot)
                max_new = req.max_tokens if req.max_tokens is not None else max(client.max_context - len(ids), 1)
                pieces = client.generate_ids(ids, max_new_tokens=max_new, temperature=req.temperature,
                                             top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop)
                async with aclosing(pieces):
                    async for piece in pieces:
                        if piece.text:
                            sent = True
                            yield piece.text
                stats_out.append(client.last_stats)
                return
            except (errors.ConfigError, errors.GenerationError, GeneratorExit):
                raise  # the request's own fault, or its reader left: the client is still in step
            except errors.ServerUnavailable:
                await gateway.discard(slot)
                if sent or attempt or not reused:
                    raise
                log.info("lost the split server connection; retrying on a fresh one")
            except BaseException:
                await gateway.discard(slot)
                raise


# ---------------------------------------------------------------------- HTTP


_GATEWAY = web.AppKey("splitllm_gateway", _Gateway)


def _json_error(err: _RequestError) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return web.json_response(err.body, status=err.status, headers=headers)


@web.middleware
async def _edge(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    """Authenticate, and turn every failure into OpenAI's error JSON with a fitting status."""
    try:
        api_key = request.app[_GATEWAY].api_key
        if api_key is not None and request.path.startswith("/v1/"):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                raise _RequestError(401, "missing API key: send 'Authorization: Bearer KEY'",
                                    code="invalid_api_key", type_="authentication_error")
            if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                raise _RequestError(401, "incorrect API key provided", code="invalid_api_key",
                                    type_="authentication_error")
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = "not_found" if exc.status == 404 else None
        return _json_error(_RequestError(exc.status, f"{exc.reason}: {request.method} {request.path}", code=code))
    except Exception as exc:
        return _json_error(_map_error(exc))


async def _models(request: web.Request) -> web.Response:
    model = {"id": request.app[_GATEWAY].model_name, "object": "model", "created": 0, "owned_by": "splitllm"}
    return web.json_response({"object": "list", "data": [model]})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "model": request.app[_GATEWAY].model_name})


def _usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens}


async def _chat(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}") from exc
    req = _parse_chat(body)
    gateway = request.app[_GATEWAY]
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": gateway.model_name,
            "system_fingerprint": gateway.fingerprint}
    stats_out: list[GenerationStats] = []
    pieces = _generate(gateway, req, stats_out)
    async with aclosing(pieces):
        if req.stream:
            return await _stream(request, req, head, pieces, stats_out)
        text = "".join([piece async for piece in pieces])
    stats = stats_out[0]
    return web.json_response({**head, "object": "chat.completion", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
        "finish_reason": _FINISH.get(stats.stop_reason, "stop"), "logprobs": None}], "usage": _usage(stats)})


async def _stream(request: web.Request, req: _ChatRequest, head: dict[str, Any], pieces: AsyncIterator[str],
                  stats_out: list[GenerationStats]) -> web.StreamResponse:
    """Server-sent events. The first piece is awaited before the headers go out, so a request that
    fails up front (bad prompt, server down) still gets a proper HTTP status; a failure after that
    is sent as an ``error`` event, which OpenAI clients raise as APIError."""
    first = await anext(pieces, None)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    extra = {"usage": None} if req.include_usage else {}

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await response.write(f"data: {data}\n\n".encode())

    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return {**head, "object": "chat.completion.chunk", **extra,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    try:
        await send(chunk({"role": "assistant", "content": ""}))
        if first is not None:
            await send(chunk({"content": first}))
            async for text in pieces:
                await send(chunk({"content": text}))
        stats = stats_out[0]
        await send(chunk({}, _FINISH.get(stats.stop_reason, "stop")))
        if req.include_usage:
            await send({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(stats)})
        await send("[DONE]")
    except ConnectionResetError:
        log.info("the HTTP client went away mid-stream")
    except Exception as exc:  # the headers are out: the error can only be an event now
        await send(_map_error(exc).body)
    return response


def create_gateway_app(bundle_path: str | os.PathLike[str] | Bundle, server_url: str, *, token: str | None = None,
                       split: int | None = None, codec: str = DEFAULT_CODEC, model_name: str | None = None,
                       api_key: str | None = None, concurrency: int = 1) -> web.Application:
    """The gateway app. Opens (and hashes) the bundle and checks the options now; connects later.

    ``token`` authenticates the gateway to the split server; ``api_key`` is what the gateway's own
    callers must send. ``model_name`` defaults to the bundle's model id. ``concurrency`` is how
    many requests run at once, each on its own SplitClient (its own server session, and its own
    KV cache; they share the device layers' ORT session); more requests wait. Raises
    BundleError or ConfigError for a bad bundle, split, codec or concurrency.
    """
    bundle = bundle_path if isinstance(bundle_path, Bundle) else Bundle.open(bundle_path)
    if split is not None and not 0 <= split <= bundle.num_layers:
        raise errors.ConfigError(f"split must be in 0..{bundle.num_layers}, got {split}")
    codecs.get_codec(codec)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise errors.ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
    app = web.Application(middlewares=[_edge])
    app[_GATEWAY] = gateway = _Gateway(bundle, server_url, token, split, codec, model_name or bundle.model_id,
                                       api_key or None, concurrency)

    async def close_client(_: web.Application) -> AsyncIterator[None]:
        yield
        await gateway.close()

    app.cleanup_ctx.append(close_client)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat)
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
                                  api_key=api_key, concurrency=args.concurrency))
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
