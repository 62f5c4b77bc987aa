"""splitllm-server: serve a bundle's server-side segments over HTTP and WebSocket."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from splitllm.errors import ConfigError, SplitLLMError
from splitllm.model.bundle import DEFAULT_VARIANT
from splitllm_server.app import create_app
from splitllm_server.config import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_CHUNK_UNITS,
    DEFAULT_MAX_BATCH,
    DEFAULT_PREFILL_CHUNK,
    ServerConfig,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitllm-server", description="Run the server side of split LLM inference.")
    p.add_argument("--bundle", required=True, help="bundle directory written by splitllm-export")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (or env SPLITLLM_TOKEN)")
    p.add_argument("--token-file", default=None, help="read the bearer token from this file")
    p.add_argument("--max-sessions", type=int, default=256)
    p.add_argument("--max-frame-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--max-context", type=int, default=None, help="cap on positions per session")
    p.add_argument("--idle-ttl", type=float, default=600.0, help="seconds before an idle session is dropped")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    p.add_argument("--no-spinning", action="store_true", help="stop idle ORT threads from spinning")
    p.add_argument("--segment-cache", type=int, default=4, help="ranges whose sessions stay loaded")
    p.add_argument("--chunk-units", type=int, default=DEFAULT_CHUNK_UNITS,
                   help="cut ranges at multiples of this many units so splits share sessions and weights "
                        "(0: one session per range)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"decode steps of different sessions run together per piece, up to this many "
                        f"(1: one at a time; default {DEFAULT_MAX_BATCH})")
    p.add_argument("--batch-window-ms", type=float, default=DEFAULT_BATCH_WINDOW_MS,
                   help=f"how long a step may wait for other sessions' steps to join its batch "
                        f"(default {DEFAULT_BATCH_WINDOW_MS:g})")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=f"prompts run in chunks of at most this many positions, between decode batches "
                        f"(default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--no-verify", action="store_true", help="skip hashing the bundle's files at start")
    p.add_argument("--weights", default=DEFAULT_VARIANT,
                   help="weights to run: fp32 (exact, default) or a variant the bundle has (fp16, int8, int4)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="decode steps in a row per session")
    p.add_argument("--max-steps-per-s", type=float, default=1000.0, help="requests per second per connection")
    p.add_argument("--certfile", default=None, help="TLS certificate (PEM): serve https/wss")
    p.add_argument("--keyfile", default=None, help="TLS private key (PEM)")
    p.add_argument("-v", "--verbose", action="store_true")
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
        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, prefill_chunk=args.prefill_chunk, intra_op_threads=args.threads,
        allow_spinning=not args.no_spinning, verify_bundle=not args.no_verify, weights=args.weights,
        max_new_tokens=args.max_new_tokens, max_steps_per_s=args.max_steps_per_s,
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


async def serve(config: ServerConfig) -> None:
    tls = ssl_context(config)
    runner = web.AppRunner(create_app(config), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=tls)
    await site.start()
    sockets = site._server.sockets if site._server else []  # noqa: SLF001 - the only way to learn port 0's pick
    port = sockets[0].getsockname()[1] if sockets else config.port
    print(f"listening on {'https' if tls else 'http'}://{config.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
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
