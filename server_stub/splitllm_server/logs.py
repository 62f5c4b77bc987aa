"""Logging set-up of splitllm-server: ``--log-level`` and ``--log-format``.

``text`` is one human-readable line per record; ``json`` is one JSON object per line (``ts`` in
ISO 8601 UTC, ``level``, ``logger``, ``message``, and ``exc`` when there is a traceback), which log
shippers (journald, Loki, Elasticsearch, Cloud Logging) parse without a pattern.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def add_logging_args(parser: argparse.ArgumentParser, default_level: str = "info") -> None:
    """``--log-level`` and ``--log-format`` on ``parser``."""
    parser.add_argument("--log-level", choices=LEVELS, default=default_level,
                        help="least severe log records printed (default: %(default)s)")
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="text lines or one JSON object per line (default: %(default)s)")


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send log records of ``level`` and above to stderr in ``fmt`` (replaces earlier handlers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(max(root.level, logging.WARNING))
