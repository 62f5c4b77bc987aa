"""Device weight variants: the fp32 blocks rewritten with fp16, 8-bit or 4-bit weights.

The fp32 blocks stay what the server runs and what export validation checks exactly against
transformers. A *variant* is a second copy of every block's graph (``layer_3.int4.onnx``, ...)
whose big weights live in their own file (``weights.int4.bin``), so a device that wants smaller,
faster weights composes its prefix from them and never touches the fp32 ones. Initializers a
variant leaves alone (norm weights, small constants) keep pointing into ``weights.bin``.

Schemes (ONNX Runtime CPU kernels; see docs/bundle.md for the measurements behind them):

- ``int4`` (the fast default): decoder-layer MatMul/Gemm weights *and* the head's copy of the tied
  table 4-bit in blocks of ``block_size`` along K, symmetric (a float scale per block, no zero
  point: MatMulNBits' implicit 8, ONNX Runtime GenAI's layout), each MatMul one kernel call.
  Scales are searched per block for the least squared error weighted by how large each input
  channel's activations are, and the mean error is added back as the kernel's bias (statistics
  from text the model writes itself: calibrate.py), the head included. Without the zero-point
  input ORT's kernel skips up to a tenth of a decode step's work, and a 4-bit head halves the largest
  single weight a local step reads. On a Q4_1 GGUF this re-quantises the blocks (docs/benchmarks.md).
- ``int4-zp``: the same layers with an integer zero point per block (asymmetric grids fit the
  GGUF's Q4_1 blocks better) and the head 8-bit: 40% less KL than int4, about 25% slower.
- ``int4-h4``: int4-zp with the head's copy of the table 4-bit with zero points too (the
  embedding lookup keeps 8 bits).
- ``int4-q41`` (the faithful one): the same blocks stored the way llama.cpp's Q4_1 stores them:
  per block a scale ``d`` and a float minimum ``m``, ``w = d * q + m`` with q in 0..15. ORT's
  MatMulNBits has no fast path for a float offset (a float zero point is exact but takes a slow
  fallback path in ORT 1.32) and its uint8 zero points cannot hold ``m``, so each MatMul becomes
  ``MatMulNBits(A, q, d)`` (no zero points: q - 8) plus a correction ``(A @ E) @ M`` where E
  (K, K/block) sums A per block and M = m + 8d (K/block, N). For a dequantised Q4_1 GGUF this
  reproduces the GGUF's weights to fp32 rounding; the correction is ~25% of a decode step.
  The tied embedding/head table is 8-bit in both (as the GGUF's Q8_0 table): the most
  sensitive weight.
- ``int8``: the int4-q41 layout with 8-bit codes (q in 0..255, still exact for a Q4_1 block).
- ``fp16``: weights stored as float16 with a Cast in front of their consumer. ORT folds the Cast
  of a constant at load time, so this halves the download and the disk, not RAM or time.

Embedding lookups (Gather on a table) dequantise only the gathered rows with standard ops, and
read the same packed table the head's MatMulNBits reads, so a tied table is stored once. Layer
MatMuls that share an input (q/k/v, gate/up) become one wider kernel call, and Constant nodes
become content-named initializers so ORT merges the layers' identical rotary subgraphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from splitllm.errors import ConfigError, ExportError
from splitllm.model.bundle import ModelShapes
from splitllm_export.graphs import fused
from splitllm_export.graphs.arch import ArchSpec
from splitllm_export.graphs.blocks import BlockInfo
from splitllm_export.graphs.onnx_util import MS_DOMAIN, WEIGHTS_FILE, GraphBuilder, WeightStore
from splitllm_export.variants.blockquant import (
    dequantize_sym,
    dequantize_zp,
    quantize_asym,
    quantize_sym,
    quantize_sym8,
    quantize_zp,
)
from splitllm_export.variants.calibrate import InputStats, layer_input_stats, weight_key

VARIANTS = ("fp16", "int8", "int4", "int4-zp", "int4-h4", "int4-q41")
BLOCK_SIZES = (16, 32, 64, 128, 256)
# MatMulNBits accuracy_level 4 quantises activations to int8 inside the kernel (as llama.cpp
# does for its Q4/Q8 dot products): measured 2x faster per call than level 0 on this CPU.
ACCURACY_LEVEL = 4
_INLINE_LIMIT_BYTES = 1024


@dataclass(frozen=True)
class Scheme:
    """How one variant stores weights. ``None`` bits means float16.

    ``layer_format`` says how a block's offset is stored: ``"min"`` a float minimum per block
    (exact for Q4_1 blocks; costs the block-sum correction), ``"zp"`` an integer zero point
    per block in MatMulNBits' own zero-point input (no extra node, with scales and zero points
    searched per block for the least squared error), ``"sym"`` no zero point at all (ONNX
    Runtime GenAI's layout: MatMulNBits' implicit 2**(bits-1); the scale searched likewise).
    """

    name: str
    layer_bits: int | None
    table_bits: int | None
    block_size: int
    accuracy_level: int
    layer_format: str = "min"
    head_bits: int = 8  # the head's copy of the tied table; the embedding Gather always reads 8 bits

    def describe(self) -> dict[str, Any]:
        text = {
            "int4-zp": "decoder weights 4-bit with an integer zero point per block (MatMulNBits with zero points, "
                    "least-squares scale search); embedding/head table 8-bit symmetric per block",
            "int4-h4": "as int4-zp, and the head's copy of the embedding/head table 4-bit with zero points "
                       "(the embedding lookup keeps its 8-bit copy)",
            "int4": "decoder weights and the head's copy of the table 4-bit symmetric per block (MatMulNBits "
                        "without zero points, weighted least-squares scale search, bias correction); the "
                        "embedding lookup keeps its 8-bit copy",
            "int4-q41": "decoder weights 4-bit with a float minimum per block (Q4_1-like, exact for a Q4_1 GGUF: "
                        "MatMulNBits + block-sum correction); embedding/head table 8-bit symmetric per block",
            "int8": "decoder weights 8-bit with a float minimum per block (MatMulNBits bits=8 + block-sum "
                    "correction); embedding/head table 8-bit symmetric per block",
            "fp16": "all weights float16, cast to float32 when the session loads",
        }[self.name]
        return {"scheme": text, "layer_bits": self.layer_bits or 16, "table_bits": self.table_bits or 16,
                "block_size": self.block_size, "accuracy_level": self.accuracy_level if self.layer_bits else None,
                "layer_format": self.layer_format if self.layer_bits else None}


def scheme_for(name: str, block_size: int = 32, accuracy_level: int = ACCURACY_LEVEL) -> Scheme:
    """The Scheme of a --client-weights name (ConfigError for an unknown name or block size)."""
    if block_size not in BLOCK_SIZES:
        raise ConfigError(f"--block-size must be one of {BLOCK_SIZES}, got {block_size}")
    if name == "int4":
        return Scheme(name, 4, 8, block_size, accuracy_level, layer_format="sym", head_bits=4)
    if name == "int4-zp":
        return Scheme(name, 4, 8, block_size, accuracy_level, layer_format="zp")
    if name == "int4-h4":
        return Scheme(name, 4, 8, block_size, accuracy_level, layer_format="zp", head_bits=4)
    if name == "int4-q41":
        return Scheme(name, 4, 8, block_size, accuracy_level)
    if name == "int8":
        return Scheme(name, 8, 8, block_size, accuracy_level)
    if name == "fp16":
        return Scheme(name, None, None, block_size, 0)
    raise ConfigError(f"unknown client weights {name!r}; choose from fp32, {', '.join(VARIANTS)}")


# ----------------------------------------------------------------------------- graph rewriting


class _Rewriter(GraphBuilder):
    """Rewrites one fp32 block's graph into its variant; new tensors are named by content."""

    def __init__(self, proto: onnx.ModelProto, prefix: str, scheme: Scheme,
                 load: Callable[[onnx.TensorProto], np.ndarray], tables: set[str]) -> None:
        super().__init__(f"{prefix}/{scheme.name}")
        self.graph = proto.graph
        self.tables = tables  # initializers used as an embedding table (Gather) in any block
        self.scheme = scheme
        self.inits = {t.name: t for t in self.graph.initializer}
        self.load = load
        self._block_sums: dict[str, str] = {}
        self.stats = {"matmul": 0, "gather": 0, "kept": 0}
        self.input_stats: dict[str, InputStats] = {}  # weight_key -> activation statistics (calibrate.py)

    def _weight(self, name: str) -> np.ndarray | None:
        """The float32 2-D initializer called ``name``, or None."""
        init = self.inits.get(name)
        if init is None or init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
            return None
        return self.load(init)

    # ------------------------------------------------------------------ per op

    def linear(self, a: str, w_kn: np.ndarray, out: str, bits: int | None, table: bool = False) -> None:
        """out = a @ w_kn in the scheme's format. a (..., K), w_kn (K, N).

        A ``table`` (the tied embedding/head matrix) is 8-bit symmetric, the layout the
        embedding's Gather reads too; other weights carry a float minimum per block and the
        block-sum correction, which also keeps the int8 activations of accuracy_level 4 away
        from the (often large) common offset of a block.
        """
        k, n = w_kn.shape
        if bits is None:
            w16 = self.tensor(w_kn.astype(np.float16))
            self.node("MatMul", [a, self.node("Cast", [w16], to=TensorProto.FLOAT)], [out])
            return
        block = self.scheme.block_size
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
        if self.scheme.accuracy_level:
            attrs["accuracy_level"] = self.scheme.accuracy_level
        if self.scheme.layer_format == "sym" and (not table or self.scheme.head_bits == 4):
            # Layers, and the head's copy of the table when it is 4-bit: the head is the widest
            # MatMul and, in 4 bits, the largest single source of error, so its scale search is
            # weighted by the final norm's output and its mean error added back like the layers'.
            bits = 4 if table else bits
            stats = self.input_stats.get(weight_key(w_kn)) if self.input_stats else None
            q, d = quantize_sym(w_kn, block, bits, None if stats is None else stats.mean_square)
            inputs = [a, self.tensor(q), self.tensor(d)]
            if stats is not None:
                bias = stats.mean @ (w_kn.astype(np.float64) - dequantize_sym(q, d, k, bits))
                inputs += ["", "", self.tensor(bias.astype(np.float32))]
            self.node("MatMulNBits", inputs, [out], **dict(attrs, bits=bits))
            return
        if table and self.scheme.head_bits == 4:
            q, d, zp = quantize_zp(w_kn, block, 4)
            self.node("MatMulNBits", [a, self.tensor(q), self.tensor(d), self.tensor(zp)], [out], **dict(attrs, bits=4))
            return
        if table:
            q, d = quantize_sym8(w_kn, block)
            self.node("MatMulNBits", [a, self.tensor(q), self.tensor(d)], [out], **dict(attrs, bits=8))
            return
        if self.scheme.layer_format == "zp":
            stats = self.input_stats.get(weight_key(w_kn)) if self.input_stats else None
            q, d, zp = quantize_zp(w_kn, block, bits, None if stats is None else stats.mean_square)
            inputs = [a, self.tensor(q), self.tensor(d), self.tensor(zp)]
            if stats is not None:  # the mean error E[A] @ (W - Wq), added back as the kernel's bias
                bias = stats.mean @ (w_kn.astype(np.float64) - dequantize_zp(q, d, zp, k, bits))
                inputs += ["", self.tensor(bias.astype(np.float32))]
            self.node("MatMulNBits", inputs, [out], **attrs)
            return
        q, d, offsets = quantize_asym(w_kn, block, bits)
        main = self.node("MatMulNBits", [a, self.tensor(q), self.tensor(d)], **attrs)
        fix = self.node("MatMul", [self._block_sum(a, k), self.tensor(np.ascontiguousarray(offsets.T))])
        self.node("Add", [main, fix], [out])

    def _block_sum(self, a: str, k: int) -> str:
        """(..., K) -> (..., K/block): sums of A per weight block, shared by every MatMul on ``a``."""
        if a not in self._block_sums:
            block = self.scheme.block_size
            ones = np.kron(np.eye(k // block, dtype=np.float32), np.ones((block, 1), dtype=np.float32))  # (K, K/b)
            self._block_sums[a] = self.node("MatMul", [a, self.tensor(ones)])
        return self._block_sums[a]

    def _quantizable(self, w_kn: np.ndarray | None, bits: int | None) -> bool:
        return w_kn is not None and (bits is None or w_kn.shape[0] % self.scheme.block_size == 0)

    def _matmul(self, node: onnx.NodeProto, bits: int | None) -> bool:
        w = self._weight(node.input[1])
        if not self._quantizable(w, bits):
            return False
        self.linear(node.input[0], w, node.output[0], bits, table=node.input[1] in self.tables)
        return True

    def _gemm(self, node: onnx.NodeProto, bits: int | None) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return False
        w = self._weight(node.input[1])
        if w is not None and bits is None:  # keep the Gemm (and a tied table's orientation), cast its weight
            cast = self.node("Cast", [self.tensor(w.astype(np.float16))], to=TensorProto.FLOAT)
            self.nodes.append(helper.make_node("Gemm", [node.input[0], cast, *node.input[2:]], list(node.output),
                                               name=self.name("Gemm_node"), **attrs))
            return True
        if w is not None and attrs.get("transB", 0):
            w = w.T
        if not self._quantizable(w, bits):
            return False
        has_bias = len(node.input) > 2 and node.input[2]
        out = self.name("gemm") if has_bias else node.output[0]
        self.linear(node.input[0], w, out, bits, table=node.input[1] in self.tables)
        if has_bias:
            self.node("Add", [out, node.input[2]], [node.output[0]])
        return True

    def _gather(self, node: onnx.NodeProto, bits: int | None) -> bool:
        """An embedding lookup on a (V, H) table: dequantise only the gathered rows."""
        if any(a.name == "axis" and a.i != 0 for a in node.attribute):
            return False
        table = self._weight(node.input[0])
        ids = node.input[1]
        if table is None:
            return False
        if bits is None:
            rows = self.node("Gather", [self.tensor(table.astype(np.float16)), ids])
            self.node("Cast", [rows], [node.output[0]], to=TensorProto.FLOAT)
            return True
        if bits != 8 or table.shape[1] % self.scheme.block_size:
            return False
        q, d = quantize_sym8(table.T, self.scheme.block_size)  # (V, H/b, b): the head's B as well
        codes = self.node("Cast", [self.node("Gather", [self.tensor(q), ids])], to=TensorProto.FLOAT)
        centred = self.node("Sub", [codes, self.tensor(np.array(128, dtype=np.float32))])
        scale = self.node("Unsqueeze", [self.node("Gather", [self.tensor(d), ids]),
                                         self.tensor(np.array([-1], dtype=np.int64))])
        values = self.node("Mul", [centred, scale])  # (..., H/b, b)
        shape = self.node("Concat", [self.node("Shape", [ids]),
                                      self.tensor(np.array([table.shape[1]], dtype=np.int64))], axis=0)
        self.node("Reshape", [values, shape], [node.output[0]])
        return True

    def _merged(self, group: list[onnx.NodeProto], bits: int) -> None:
        """MatMuls reading the same input (q/k/v, gate/up) as one wider MatMulNBits, then Split.

        Each kernel call (and each block-sum correction) has a fixed cost that dominates at one
        token per step; one call over the concatenated columns pays it once.
        """
        weights = [self._weight(node.input[1]) for node in group]
        wide = self.name("merged")
        self.linear(group[0].input[0], np.concatenate(weights, axis=1), wide, bits)
        sizes = np.array([w.shape[1] for w in weights], dtype=np.int64)
        self.node("Split", [wide, self.tensor(sizes)], [node.output[0] for node in group], axis=-1)

    def _groups(self) -> list[list[onnx.NodeProto]]:
        """Quantisable layer MatMuls grouped by their input, groups of two or more only."""
        bits = self.scheme.layer_bits
        by_input: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            if (bits is not None and node.op_type == "MatMul" and node.input[1] in self.inits
                    and node.input[1] not in self.tables and self._quantizable(self._weight(node.input[1]), bits)):
                by_input.setdefault(node.input[0], []).append(node)
        return [group for group in by_input.values() if len(group) > 1]

    def _share_constants(self) -> None:
        """Constant nodes become initializers named by content, shared by every block.

        The exporter prefixes Constant outputs per block, so each layer's rotary-embedding
        subgraph (position_ids -> cos, sin) looks different to ORT. With identical names the
        composed graph's copies are identical and ORT's common-subexpression elimination runs
        that subgraph once per step instead of once per layer.
        """
        renames: dict[str, str] = {}
        kept: list[onnx.NodeProto] = []
        for node in self.graph.node:
            value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
            if value is None:
                kept.append(node)
                continue
            renames[node.output[0]] = self.tensor(numpy_helper.to_array(value))
        for node in kept:
            node.input[:] = [renames.get(name, name) for name in node.input]
        self.graph.ClearField("node")
        self.graph.node.extend(kept)

    def run(self) -> None:
        """Rewrite every MatMul/Gemm/Gather with a constant weight; the rest is copied."""
        self._share_constants()
        groups = {group[0].output[0]: group for group in self._groups()}
        merged_later = {node.output[0] for group in groups.values() for node in group[1:]}
        for node in self.graph.node:
            if node.output[0] in merged_later:
                continue
            if node.output[0] in groups:
                self._merged(groups[node.output[0]], self.scheme.layer_bits or 0)
                self.stats["matmul"] += len(groups[node.output[0]])
                continue
            weight = node.input[0] if node.op_type == "Gather" else (node.input[1] if len(node.input) > 1 else "")
            bits = self.scheme.table_bits if weight in self.tables else self.scheme.layer_bits
            handler = {"MatMul": self._matmul, "Gemm": self._gemm, "Gather": self._gather}.get(node.op_type)
            if handler is not None and weight in self.inits:
                if handler(node, bits):
                    self.stats["gather" if node.op_type == "Gather" else "matmul"] += 1
                    continue
                self.stats["kept"] += 1
            self.nodes.append(node)


def _embedding_tables(protos: dict[str, onnx.ModelProto]) -> set[str]:
    """Initializer names used as a Gather table anywhere (the tied table is also the head's weight)."""
    return {n.input[0] for p in protos.values() for n in p.graph.node
            if n.op_type == "Gather" and n.input[0] in {t.name for t in p.graph.initializer}}


def write_variant(out_dir: Path, blocks: list[BlockInfo], scheme: Scheme, model: Any = None,
                  spec: ArchSpec | None = None, shapes: ModelShapes | None = None) -> dict[str, Any]:
    """Write ``<block>.<variant>.onnx`` for every block and ``weights.<variant>.bin``.

    With the torch ``model`` (and its registry ``spec`` and ``shapes``), decoder layers that
    :func:`splitllm_export.graphs.fused.fusable` accepts are built as fused layers from its weights;
    other blocks are the fp32 graphs rewritten. Returns the variant's manifest entry (blocks,
    files, scheme; the caller adds quality). Raises ExportError when the fp32 blocks cannot be read.
    """
    weights_name = f"weights.{scheme.name}.bin"
    try:
        fp32 = np.memmap(out_dir / WEIGHTS_FILE, dtype=np.uint8, mode="r")
        protos = {b.name: onnx.load(str(out_dir / b.file), load_external_data=False) for b in blocks}
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the fp32 blocks in {out_dir}: {exc}") from exc

    def load(init: onnx.TensorProto) -> np.ndarray:
        if init.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(init)
        ext = {e.key: e.value for e in init.external_data}
        start, length = int(ext["offset"]), int(ext["length"])
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        return np.frombuffer(fp32[start:start + length], dtype=dtype).reshape(tuple(init.dims))

    tables = _embedding_tables(protos)
    store = WeightStore(out_dir / weights_name)
    entry: dict[str, Any] = {"blocks": {}, "files": [weights_name], **scheme.describe()}
    totals = {"matmul": 0, "gather": 0, "kept": 0}
    not_fused = "no model given" if model is None or spec is None or shapes is None else fused.fusable(model, spec)
    rotary = fused.rotary_tables(model, spec, shapes) if not_fused is None and spec and shapes else None
    entry["fused_layers"] = not_fused is None
    input_stats = layer_input_stats(model) if rotary is not None and scheme.layer_format in ("zp", "sym") else {}
    if input_stats:
        entry["calibration"] = "activation statistics of 256 tokens the fp32 model sampled itself (calibrate.py)"
    if not_fused is not None:
        entry["not_fused_because"] = not_fused
    try:
        for block in blocks:
            proto = protos[block.name]
            inputs = block.inputs
            index = int(block.name.split(".")[1]) if block.name.startswith("layer.") else None
            if rotary is not None and index is not None and spec is not None and spec.layout and shapes:
                proto = fused.layer_proto(index, shapes, proto)
                rewriter = _Rewriter(proto, block.name, scheme, load, tables)
                rewriter.input_stats = input_stats
                fused.fused_layer(rewriter, model, spec, index, shapes, rotary[index], scheme.layer_bits)
                inputs = [i.name for i in proto.graph.input]
                rewriter.stats["matmul"] += fused.linear_count(spec.layout)  # all rewritten, some merged
            else:
                rewriter = _Rewriter(proto, block.name, scheme, load, tables)
                rewriter.input_stats = input_stats  # the head's, for int4
                rewriter.run()
            _install_tensors(proto, rewriter, store, weights_name)
            file = block.file.replace(".onnx", f".{scheme.name}.onnx")
            onnx.save_model(proto, str(out_dir / file))
            entry["blocks"][block.name] = {"file": file, "inputs": inputs, "outputs": block.outputs,
                                           "params": block.params}
            entry["files"].append(file)
            totals = {k: totals[k] + rewriter.stats[k] for k in totals}
    finally:
        store.close()
    entry["weights_rewritten"] = totals
    entry["size_bytes"] = sum((out_dir / f).stat().st_size for f in entry["files"])
    return entry


def _install_tensors(proto: onnx.ModelProto, rw: _Rewriter, store: WeightStore, weights_name: str) -> None:
    """Swap in the rewritten nodes, drop weights nobody reads, add the new ones (big ones external)."""
    graph = proto.graph
    graph.ClearField("node")
    graph.node.extend(rw.nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used and t.name not in rw.new_tensors]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    for name, array in rw.new_tensors.items():
        tensor = numpy_helper.from_array(array, name)
        data = np.ascontiguousarray(array).tobytes()
        if len(data) >= _INLINE_LIMIT_BYTES:
            offset, length = store.put(name, data)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", weights_name), ("offset", str(offset)), ("length", str(length))):
                ext = tensor.external_data.add()
                ext.key, ext.value = key, value
        graph.initializer.append(tensor)
    if not any(op.domain == MS_DOMAIN for op in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
