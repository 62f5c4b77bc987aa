"""splitllm-server: serve a bundle's server-side segments over HTTP and WebSocket."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from splitllm import __version__
from splitllm.errors import ConfigError, SplitLLMError
from splitllm_server.app import STATE, create_app, drain
from splitllm_server.config import ServerConfig
from splitllm_server.logs import add_logging_args, configure

# The defaults live once, on ServerConfig's fields; the options show them.
DEFAULTS: dict[str, object] = {f.name: f.default for f in dataclasses.fields(ServerConfig)
                               if f.default is not dataclasses.MISSING}


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitllm-server", description="Run the server side of split LLM inference.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--bundle", required=True, help="bundle directory written by splitllm-export")
    p.add_argument("--host", default=DEFAULTS["host"], help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULTS["port"], help="port (0 picks a free one)")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (or env SPLITLLM_TOKEN)")
    p.add_argument("--token-file", default=None, help="read the bearer token from this file")
    p.add_argument("--max-sessions", type=int, default=DEFAULTS["max_sessions"], help="sessions held at once (too_many_sessions beyond)")
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULTS["max_frame_bytes"], help="largest WebSocket frame accepted")
    p.add_argument("--max-context", type=int, default=DEFAULTS["max_context"], help="cap on positions per session (default: the model's)")
    p.add_argument("--idle-ttl", type=float, default=DEFAULTS["idle_ttl_s"], help="seconds before an idle session is dropped")
    p.add_argument("--threads", type=int, default=DEFAULTS["intra_op_threads"], help="ONNX Runtime intra-op threads (0 = all cores)")
    p.add_argument("--no-spinning", action="store_true", help="stop idle ORT threads from spinning")
    p.add_argument("--segment-cache", type=int, default=DEFAULTS["segment_cache"], help="ranges whose sessions stay loaded")
    p.add_argument("--chunk-units", type=int, default=DEFAULTS["chunk_units"],
                   help="cut ranges at multiples of this many units so splits share sessions and weights "
                        "(0: one session per range)")
    p.add_argument("--max-batch", type=int, default=DEFAULTS["max_batch"],
                   help="decode steps of different sessions run together per piece, up to this many "
                        "(1: one at a time)")
    p.add_argument("--batch-window-ms", type=float, default=DEFAULTS["batch_window_ms"],
                   help="how long a step may wait for other sessions' steps to join its batch")
    p.add_argument("--active-window", type=float, default=DEFAULTS["active_window_s"], metavar="SECONDS",
                   help="a session that stepped within this long counts as a batch row (for the batch "
                        "window and for /v1/plan's prices)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULTS["prefill_chunk"],
                   help="prompts run in chunks of at most this many positions, between decode batches")
    p.add_argument("--no-verify", action="store_true", help="skip hashing the bundle's files at start")
    p.add_argument("--weights", default=DEFAULTS["weights"],
                   help="weights to run: fp32 (exact) or a variant the bundle has (fp16, int8, int4)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"], help="decode steps in a row per session")
    p.add_argument("--max-steps-per-s", type=float, default=DEFAULTS["max_steps_per_s"], help="requests per second per connection")
    p.add_argument("--handshake-timeout", type=_positive_float, default=DEFAULTS["handshake_timeout_s"],
                   help="seconds a WebSocket gets to complete a valid Hello before it is closed (1008)")
    p.add_argument("--max-conns-per-addr", type=int, default=DEFAULTS["max_conns_per_addr"],
                   help="open WebSockets per client address (HTTP 429 beyond; 0 = no cap)")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDR",
                   help="believe X-Forwarded-For from this peer address for the per-address cap (repeatable)")
    p.add_argument("--drain-timeout", type=float, default=DEFAULTS["drain_timeout_s"],
                   help="on SIGTERM, seconds in-flight steps get before every client is told to reconnect")
    p.add_argument("--drain-grace", type=float, default=DEFAULTS["drain_grace_s"],
                   help="on SIGTERM, seconds the server reports not ready (/readyz 503) while sessions go on, "
                        "before it stops listening and tells clients to reconnect; behind a balancer use its "
                        "check interval x fall count (deploy/haproxy.cfg: 2 s) plus a margin")
    p.add_argument("--providers", default="cpu",
                   help="ONNX Runtime execution providers in order, comma-separated (cuda, tensorrt, rocm, openvino, "
                        "coreml, dml, ... or full ORT names); missing ones fall back to the next with a warning, "
                        "CPU always last")
    p.add_argument("--certfile", default=None, help="TLS certificate (PEM): serve https/wss")
    p.add_argument("--keyfile", default=None, help="TLS private key (PEM)")
    add_logging_args(p, default_level="warning")
    p.add_argument("-v", "--verbose", action="store_true", help="same as --log-level info")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    token = args.token or os.environ.get("SPLITLLM_TOKEN") or None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {args.token_file}: {exc}") from exc
    return ServerConfig(
        bundle=Path(args.bundle), host=args.host, port=args.port, token=token,
        max_sessions=args.max_sessions, max_frame_bytes=args.max_frame_bytes, max_context=args.max_context,
        idle_ttl_s=args.idle_ttl, segment_cache=args.segment_cache, chunk_units=args.chunk_units,
        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, active_window_s=args.active_window, prefill_chunk=args.prefill_chunk, intra_op_threads=args.threads,
        allow_spinning=not args.no_spinning, verify_bundle=not args.no_verify, weights=args.weights,
        max_new_tokens=args.max_new_tokens, max_steps_per_s=args.max_steps_per_s,
        handshake_timeout_s=args.handshake_timeout, max_conns_per_addr=args.max_conns_per_addr,
        trusted_proxies=tuple(args.trusted_proxy), drain_timeout_s=args.drain_timeout,
        drain_grace_s=args.drain_grace,
        providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
        certfile=Path(args.certfile) if args.certfile else None,
        keyfile=Path(args.keyfile) if args.keyfile else None,
    )


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.certfile is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(config.certfile), str(config.keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {config.certfile} / key {config.keyfile}: {exc}") from exc
    return ctx


log = logging.getLogger("splitllm.server")


async def serve(config: ServerConfig) -> None:
    """Serve until a signal. SIGTERM drains (see :func:`splitllm_server.app.drain`): /readyz
    turns 503, after ``drain_grace_s`` the listener closes, in-flight steps finish, every client gets a Close "server
    draining; reconnect" within ``drain_timeout_s``, then the process exits. SIGINT, or a
    second SIGTERM, stops at once."""
    tls = ssl_context(config)
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=tls)
    await site.start()
    sockets = site._server.sockets if site._server else []  # type: ignore[attr-defined]  # noqa: SLF001 - port 0's pick
    port = sockets[0].getsockname()[1] if sockets else config.port
    print(f"listening on {'https' if tls else 'http'}://{config.host}:{port}", flush=True)
    stop, draining = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, lambda: (stop if draining.is_set() else draining).set())
    try:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(draining.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if draining.is_set() and not stop.is_set():
            log.info("SIGTERM: draining (grace %g s, then up to %g s)", config.drain_grace_s,
                        config.drain_timeout_s)
            # After the grace period new connections are refused: the balancer sends them elsewhere.
            drained = asyncio.ensure_future(drain(app, stop_listening=site.stop))
            await asyncio.wait([drained, waits[0]], return_when=asyncio.FIRST_COMPLETED)
            if drained.done():
                print(f"drained {drained.result()} connections", flush=True)
        for waiter in waits:
            waiter.cancel()
    finally:
        if STATE in app:
            app[STATE].draining = True
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure("info" if args.verbose and args.log_level == "warning" else args.log_level, args.log_format)
    try:
        asyncio.run(serve(config_from_args(args)))
    except SplitLLMError as exc:
        print(f"splitllm-server: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"splitllm-server: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
