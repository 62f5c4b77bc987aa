"""ONNX helpers shared by the block exporter, the fused layers and the weight variants.

Kept apart from all three so that the dependencies go one way: ``blocks`` and ``quantize``
use ``fused``, and all of them use this module, which uses none of them.

- :func:`tensor_digest` names a tensor after its content, which is how a weight used by several
  blocks (a tied embedding, a shared rotary table) ends up stored once.
- :class:`WeightStore` appends distinct tensors to one page-aligned external-data file.
- :class:`GraphBuilder` collects new nodes and content-named tensors; a subclass supplies
  :meth:`GraphBuilder.linear`, the weight format of a matrix product.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

WEIGHTS_FILE = "weights.bin"
ALIGN_BYTES = 4096
MS_DOMAIN = "com.microsoft"
MS_OPS = frozenset({"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization", "FastGelu"})


def tensor_digest(array: np.ndarray) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes: equal tensors get equal names."""
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class WeightStore:
    """Appends distinct tensors to one external-data file and remembers where each one went."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._offsets: dict[str, tuple[int, int]] = {}

    def put(self, digest: str, data: bytes) -> tuple[int, int]:
        """(offset, length) of ``data`` in the file; written once per digest, page-aligned."""
        if digest not in self._offsets:
            offset = self._file.tell()
            pad = (-offset) % ALIGN_BYTES
            if pad:
                self._file.write(b"\0" * pad)
                offset += pad
            self._file.write(data)
            self._offsets[digest] = (offset, len(data))
        return self._offsets[digest]

    def close(self) -> None:
        self._file.close()


class GraphBuilder:
    """Collects nodes (names under ``prefix``) and new tensors named by their content.

    The node and tensor interface the fused layers are built with; a subclass decides how a
    matrix product stores its weight (:meth:`linear`): fp32 for the exact blocks, a device
    variant's format in ``quantize``.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.new_tensors: dict[str, np.ndarray] = {}
        self._count = 0

    def name(self, what: str) -> str:
        """A fresh value name under the builder's prefix."""
        self._count += 1
        return f"{self.prefix}/{what}_{self._count}"

    def tensor(self, array: np.ndarray) -> str:
        """The name of a constant tensor with this content (added once)."""
        name = f"w_{tensor_digest(array)[:24]}"
        self.new_tensors[name] = array
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: Any) -> str:
        """Append one node (contrib ops in the Microsoft domain); returns its first output."""
        outs = outputs or [self.name(op)]
        domain = MS_DOMAIN if op in MS_OPS else ""
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_node"), domain=domain, **attrs))
        return outs[0]

    def linear(self, a: str, w_kn: np.ndarray, out: str, bits: int | None) -> None:
        """Write ``out = a @ w_kn`` (w_kn (K, N) float32) in the builder's weight format."""
        raise NotImplementedError
