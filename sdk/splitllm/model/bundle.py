"""A bundle on disk: the manifest, per-block graphs, shared weights, tokenizer.

Units are numbered in execution order: unit 0 is the embedding block, units 1..L the decoder
layers, unit L+1 the head. A *range* [start, end) of units is what one side runs; the prefix
of split k is units [0, k+1) and the suffix is [k+1, L+2). Any range composes into one fused
ONNX Runtime session (see ``splitllm.model.graphs``).

A bundle may also carry device weight *variants* (``manifest["variants"]``, docs/bundle.md):
the same blocks with fp16, 8-bit or 4-bit weights in their own files. The fp32 blocks are what
the server runs and what export validation checks; a client may compose its ranges from a
variant instead (``range_graph(..., variant="int4")``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from splitllm.errors import BundleCorrupt, BundleNotFound, BundleVersionError, ConfigError
from splitllm.model.graphs import compose

MANIFEST = "manifest.json"
FORMAT = "splitllm-bundle"
FORMAT_VERSION = 1
DEFAULT_VARIANT = "fp32"  # the exact blocks in manifest["blocks"]

__all__ = ["Bundle", "DEFAULT_VARIANT", "ModelShapes", "FORMAT_VERSION", "MANIFEST", "file_sha256"]


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelShapes:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_context: int

    @property
    def kv_bytes_per_position(self) -> int:
        """Bytes of one decoder layer's fp32 keys and values for one position (what a KV move sends)."""
        return 2 * self.num_kv_heads * self.head_dim * 4

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShapes:
        try:
            return cls(**{f: int(data[f]) for f in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleCorrupt(f"manifest 'shapes' is incomplete or invalid: {exc!r}") from exc


class Bundle:
    """An opened, verified bundle. Create with :meth:`Bundle.open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], manifest_sha256: str) -> None:
        self.path = path
        self.manifest = manifest
        self.bundle_id = manifest_sha256
        self.shapes = ModelShapes.from_dict(manifest.get("shapes", {}))
        blocks = manifest.get("blocks")
        if not isinstance(blocks, dict):
            raise BundleCorrupt(f"{path / MANIFEST}: 'blocks' is missing")
        self._blocks: dict[str, dict[str, Any]] = blocks
        variants = manifest.get("variants", {})
        if not isinstance(variants, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("blocks"), dict) for v in variants.values()
        ):
            raise BundleCorrupt(f"{path / MANIFEST}: 'variants' must map names to entries with 'blocks'")
        self._variants: dict[str, dict[str, Any]] = variants
        self._graph_bytes: dict[tuple[str, str], bytes] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
        """Read and check a bundle directory.

        ``verify=True`` hashes every file listed in the manifest and raises
        :class:`~splitllm.errors.BundleCorrupt` naming the first file that is missing or differs.
        """
        root = Path(path)
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise BundleNotFound(f"no bundle directory at {root}")
        if not manifest_path.is_file():
            raise BundleNotFound(f"{root} is not a bundle: {MANIFEST} is missing")
        try:
            raw = manifest_path.read_bytes()
            manifest = json.loads(raw)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleCorrupt(f"cannot read {manifest_path}: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleCorrupt(f"{manifest_path} is not a SplitLLM manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleVersionError(
                f"{manifest_path} has format version {version!r}; this SDK reads version {FORMAT_VERSION}"
            )
        bundle = cls(root, manifest, hashlib.sha256(raw).hexdigest())
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleCorrupt(f"{self.path / MANIFEST}: 'files' is missing")
        for name, meta in sorted(files.items()):
            file_path = self.path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise BundleCorrupt(f"manifest lists a file outside the bundle: {name!r}")
            if not file_path.is_file():
                raise BundleCorrupt(f"bundle file {name} is missing from {self.path}")
            size = file_path.stat().st_size
            if size != meta.get("size_bytes"):
                raise BundleCorrupt(
                    f"bundle file {name} has {size} bytes; the manifest says {meta.get('size_bytes')}"
                )
            if file_sha256(file_path) != meta.get("sha256"):
                raise BundleCorrupt(f"bundle file {name} does not match its SHA-256 in the manifest")

    # ------------------------------------------------------------------ facts

    @property
    def num_layers(self) -> int:
        return self.shapes.num_layers

    @property
    def num_units(self) -> int:
        """Embeddings + decoder layers + head."""
        return self.shapes.num_layers + 2

    @property
    def model_id(self) -> str:
        return str(self.manifest.get("model", {}).get("id", "unknown"))

    @property
    def cost(self) -> dict[str, Any]:
        """The per-unit cost table (see docs/bundle.md)."""
        return self.manifest.get("cost", {})

    @property
    def variants(self) -> list[str]:
        """Weight variants a range can be composed from: "fp32" first, then the device variants."""
        return [DEFAULT_VARIANT, *sorted(self._variants)]

    def check_variant(self, variant: str) -> str:
        """``variant`` if this bundle has it, else ConfigError naming the ones it has."""
        if variant != DEFAULT_VARIANT and variant not in self._variants:
            hint = "" if self._variants else " (export with --client-weights to add device variants)"
            raise ConfigError(
                f"bundle {self.path} has no {variant!r} weights; available: {', '.join(self.variants)}{hint}"
            )
        return variant

    @cached_property
    def text(self):  # noqa: ANN201 - splitllm.model.text.TextCodec, imported lazily
        from splitllm.model.text import TextCodec

        meta = self.manifest.get("tokenizer")
        if not isinstance(meta, dict):
            raise BundleCorrupt(f"{self.path / MANIFEST}: 'tokenizer' is missing")
        return TextCodec.from_manifest(self.path, meta)

    def split_range(self, split: int, side: str) -> tuple[int, int]:
        """Units of the prefix ("client") or suffix ("server") of split k (k layers on the client)."""
        if not 0 <= split <= self.num_layers:
            raise ConfigError(f"split must be in 0..{self.num_layers}, got {split}")
        if side == "client":
            return 0, split + 1
        if side == "server":
            return split + 1, self.num_units
        raise ConfigError(f"side must be 'client' or 'server', got {side!r}")

    def block_names(self, start: int, end: int, *, last_logits_only: bool = False) -> list[str]:
        if not 0 <= start < end <= self.num_units:
            raise ConfigError(f"unit range [{start}, {end}) is not within [0, {self.num_units})")
        names = []
        for unit in range(start, end):
            if unit == 0:
                names.append("embed")
            elif unit == self.num_units - 1:
                names.append("head_last" if last_logits_only else "head")
            else:
                names.append(f"layer.{unit - 1}")
        return names

    # ------------------------------------------------------------------ graphs

    def _block_bytes(self, name: str, variant: str = DEFAULT_VARIANT) -> bytes:
        key = (variant, name)
        if key not in self._graph_bytes:
            blocks = self._blocks if variant == DEFAULT_VARIANT else self._variants[variant]["blocks"]
            meta = blocks.get(name)
            if not isinstance(meta, dict) or "file" not in meta:
                raise BundleCorrupt(f"manifest has no block {name!r} in the {variant} weights")
            try:
                self._graph_bytes[key] = (self.path / meta["file"]).read_bytes()
            except OSError as exc:
                raise BundleCorrupt(f"cannot read block {name} ({meta['file']}): {exc}") from exc
        return self._graph_bytes[key]

    def range_graph(
        self, start: int, end: int, *, last_logits_only: bool = False, variant: str = DEFAULT_VARIANT
    ) -> bytes:
        """One serialized ONNX model running units [start, end), weights referenced externally.

        ``variant`` picks the blocks' weights ("fp32" or one of :attr:`variants`; ConfigError
        otherwise). Only the weights of the range's blocks are referenced, so a session loads
        just those.
        """
        self.check_variant(variant)
        names = self.block_names(start, end, last_logits_only=last_logits_only)
        return compose([self._block_bytes(n, variant) for n in names], name=f"units_{start}_{end}")

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, model={self.model_id!r}, layers={self.num_layers})"
