"""The ``splitllm-gateway`` command: options, logging to stderr, and serving until SIGINT/SIGTERM.

Logging: ``--log-format text`` is one human-readable line per record; ``json`` is one JSON object
per line (``ts`` ISO 8601 UTC, ``level``, ``logger``, ``message``, ``exc`` with a traceback), the
same fields as the split server's, so one log shipper configuration reads both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from splitllm import __version__, errors
from splitllm_gateway.app import DEFAULT_CODEC, serve_gateway
from splitllm_gateway.clients import DEFAULT_KEEPALIVE_S, DEFAULT_QUEUE_TIMEOUT_S

__all__ = ["build_parser", "configure_logging", "main"]

LOG_LEVELS = ("debug", "info", "warning", "error")


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send records of ``level`` and above to stderr as ``fmt`` ("text" or "json"); replaces the
    root logger's handlers. aiohttp's access log stays at warning (one line per request is noise)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonLines() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(max(root.level, logging.WARNING))


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
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                   help="least severe log records printed to stderr (default: %(default)s)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text lines or one JSON object per line (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``splitllm-gateway``: exit code 0 on a clean stop, 1 on a configuration or listen error."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return _cmd_serve_openai(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
