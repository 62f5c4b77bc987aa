"""The texts the quality benchmarks score models on: real, offline, deterministic.

Every built-in text ships with Python itself (its standard library), so a clean checkout on
any machine with the venv has them; they are of different kinds because a codec or a weight
format may hurt one kind more than another:

- ``pydoc``: ``pydoc_data.topics`` values in sorted key order (the language reference as
  English prose with code samples: documentation);
- ``code``: the source of the standard library's ``argparse.py`` (Python code, comments and
  docstrings);
- ``license``: Python's ``LICENSE.txt`` (the history of the software, then the licence
  agreements: plain and legal English prose);
- ``news``: IDLE's ``NEWS.txt`` (a changelog: terse notes with issue numbers); not in the
  default set, there for a fourth opinion.

``--text-file PATH`` scores any UTF-8 file as well (named after the file). Tune on one text,
report on all.
"""

from __future__ import annotations

import argparse
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitllm import Bundle
from splitllm.errors import ConfigError

DEFAULT_TEXTS = "pydoc,code,license"


def _pydoc() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _stdlib_file(relative: str) -> Callable[[], str]:
    def read() -> str:
        return (Path(sysconfig.get_paths()["stdlib"]) / relative).read_text(encoding="utf-8")

    return read


BUILTIN: dict[str, tuple[str, str, Callable[[], str]]] = {  # name -> (kind, where from, loader)
    "pydoc": ("docs", "pydoc_data.topics values in sorted key order", _pydoc),
    "code": ("code", "the stdlib's argparse.py", _stdlib_file("argparse.py")),
    "license": ("legal prose", "Python's LICENSE.txt", _stdlib_file("LICENSE.txt")),
    "news": ("changelog", "the stdlib's idlelib/NEWS.txt", _stdlib_file("idlelib/NEWS.txt")),
}


@dataclass(frozen=True)
class Text:
    """A named text and where it came from; ``tokens`` cut by :func:`text_tokens`."""

    name: str
    kind: str
    source: str
    content: str


def load_text(name: str) -> Text:
    """A built-in text by name (ConfigError if unknown or missing from this Python)."""
    if name not in BUILTIN:
        raise ConfigError(f"unknown text {name!r}; built-in texts: {', '.join(BUILTIN)} (or use --text-file)")
    kind, source, loader = BUILTIN[name]
    try:
        return Text(name, kind, source, loader())
    except (OSError, ImportError) as exc:
        raise ConfigError(f"text {name!r} ({source}) is not available in this Python: {exc}") from exc


def file_text(path: Path) -> Text:
    """Any UTF-8 file as a text named after it (ConfigError if unreadable)."""
    try:
        return Text(path.stem, "file", str(path), path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --text-file {path} as UTF-8: {exc}") from exc


def text_tokens(bundle: Bundle, text: Text, n_tokens: int) -> np.ndarray:
    """The first ``n_tokens`` ids (N,) int64 of ``text`` in the bundle's tokenizer (ConfigError if short)."""
    ids = bundle.text.encode(text.content)
    if len(ids) < n_tokens:
        raise ConfigError(f"text {text.name!r} has only {len(ids)} tokens, asked for {n_tokens}")
    return np.asarray(ids[:n_tokens], dtype=np.int64)


def add_texts_arguments(parser: argparse.ArgumentParser, tokens: int = 1024) -> None:
    """``--texts``, ``--text-file`` (repeatable) and ``--tokens``, shared by the quality benchmarks."""
    parser.add_argument("--texts", default=DEFAULT_TEXTS,
                        help=f"built-in texts, comma-separated, from {', '.join(BUILTIN)}; 'none' for "
                             "--text-file only (default %(default)s)")
    parser.add_argument("--text-file", type=Path, action="append", default=[],
                        help="also score this UTF-8 file (repeatable)")
    parser.add_argument("--tokens", type=int, default=tokens, help="tokens of each text (default %(default)s)")


def chosen_texts(args: argparse.Namespace) -> list[Text]:
    """The texts ``--texts`` and ``--text-file`` name, in that order (ConfigError if none)."""
    names = [] if args.texts in ("", "none") else [n.strip() for n in args.texts.split(",") if n.strip()]
    texts = [load_text(n) for n in names] + [file_text(p) for p in args.text_file]
    if not texts:
        raise ConfigError("no text to score: give --texts and/or --text-file")
    return texts
