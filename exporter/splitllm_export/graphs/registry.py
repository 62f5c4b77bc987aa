"""The architecture registry: look up a family's ArchSpec by config, GGUF name or family name."""

from __future__ import annotations

from typing import Any

from splitllm.errors import UnsupportedArchitecture
from splitllm_export.families import FAMILIES
from splitllm_export.graphs.arch import ArchSpec

ARCHS: dict[str, ArchSpec] = {spec.family: spec for spec in FAMILIES}


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHS.values() for t in spec.model_types)


def supported_gguf_archs() -> list[str]:
    return sorted({a for spec in ARCHS.values() for a in spec.gguf_archs})


def family_names() -> list[str]:
    """Registered family names (the choices of ``splitllm-export --tiny``)."""
    return list(ARCHS)


def spec_named(family: str) -> ArchSpec:
    """The ArchSpec of a family name, or UnsupportedArchitecture listing the registered ones."""
    if family not in ARCHS:
        raise UnsupportedArchitecture(f"no model family {family!r}; registered families are {', '.join(ARCHS)}")
    return ARCHS[family]


def check_gguf_arch(arch: str) -> None:
    """Refuse a GGUF ``general.architecture`` no registry entry reads, naming the supported ones."""
    if arch not in supported_gguf_archs():
        raise UnsupportedArchitecture(
            f"cannot split GGUF architecture {arch!r}: supported are {', '.join(supported_gguf_archs())}"
        )


def spec_for(config: Any) -> ArchSpec:
    """The ArchSpec for a transformers config, or UnsupportedArchitecture naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    rope_type = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedArchitecture(
            f"cannot split {model_type!r} with rope_scaling type {rope_type!r}: its rotary "
            "frequencies depend on the sequence length, which a fixed graph cannot follow"
        )
    for spec in ARCHS.values():
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitecture(
        f"cannot split architecture {model_type!r}: supported model types are "
        + ", ".join(supported_model_types())
    )
