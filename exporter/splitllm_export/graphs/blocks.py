"""Export a model's blocks to ONNX and store every weight once.

Each block (embeddings, decoder layer i, head, head_last) is exported on its own with the
TorchScript exporter, then rewritten so that blocks compose (see ``splitllm.model.graphs``):
intermediate value names get a block prefix, interface names stay canonical, and every
initializer is renamed after a hash of its content. Initializers of 1 KiB or more go into one
shared ``weights.bin`` (each distinct tensor once, page-aligned so ONNX Runtime can map it), so a
tied embedding matrix used by both the embedding Gather and the head MatMul is stored once and a
bundle is about the size of one monolithic export however many splits it serves.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from splitllm.errors import ExportError
from splitllm_export.graphs import fused
from splitllm_export.graphs.arch import ArchSpec, Shapes
from splitllm_export.graphs.onnx_util import WEIGHTS_FILE, WeightStore, tensor_digest

__all__ = ["OPSET", "WEIGHTS_FILE", "BlockInfo", "WeightStore", "export_blocks"]

OPSET = 17
_INLINE_LIMIT_BYTES = 1024


@dataclass(frozen=True)
class BlockInfo:
    """What the manifest records about one exported block."""

    name: str
    file: str
    inputs: list[str]
    outputs: list[str]
    params: int


def _rewrite(model: onnx.ModelProto, prefix: str, interface: set[str], store: WeightStore) -> None:
    """Prefix internal names, content-name initializers, move big ones to the shared file."""
    graph = model.graph
    for node in graph.node:
        if node.attribute and any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"block {prefix} has a control-flow node ({node.op_type}); cannot compose it")
    renames: dict[str, str] = {}
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        digest = tensor_digest(array)
        new_name = f"w_{digest[:24]}"
        renames[init.name] = new_name
        data = np.ascontiguousarray(array).tobytes()
        init.name = new_name
        if len(data) >= _INLINE_LIMIT_BYTES:
            offset, length = store.put(digest, data)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(field)
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value

    def rename(name: str) -> str:
        if not name or name in interface:
            return name
        if name in renames:
            return renames[name]
        return f"{prefix}/{name}"

    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        if node.name:
            node.name = f"{prefix}/{node.name}"
    for vi in graph.value_info:
        vi.name = rename(vi.name)


def _export_module(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    fold_constants: bool = True,
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buffer,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=fold_constants,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def _count_params(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def export_blocks(
    model: nn.Module,
    spec: ArchSpec,
    shapes: Shapes,
    out_dir: Path,
    progress: Callable[[str], None] | None = None,
    fused_layers: bool = True,
) -> list[BlockInfo]:
    """Write embed.onnx, layer_{i}.onnx, head.onnx, head_last.onnx and weights.bin into out_dir.

    With ``fused_layers`` (default) decoder layers that ``splitllm_export.graphs.fused`` can build are
    written as fused fp32 layers from the weights (GroupQueryAttention, ~20 nodes); the other
    blocks, and every block of a family without a fused form, are exported from PyTorch.
    """
    rotary = None
    if fused_layers and fused.fusable(model, spec) is None:
        rotary = fused.rotary_tables(model, spec, shapes)
    b, t, p = 1, 3, 2
    h, kv, d = shapes.hidden_size, shapes.num_kv_heads, shapes.head_dim
    ids = torch.zeros((b, t), dtype=torch.int64)
    positions = torch.arange(p, p + t, dtype=torch.int64).unsqueeze(0)
    hidden = torch.randn(b, t, h)
    mask = torch.zeros(b, 1, t, p + t)
    past = torch.randn(b, kv, p, d)
    batch_seq = {0: "batch", 1: "seq"}
    store = WeightStore(out_dir / WEIGHTS_FILE)
    blocks: list[BlockInfo] = []

    def save(name: str, file: str, proto: onnx.ModelProto, ins: list[str], outs: list[str], module: nn.Module) -> None:
        _rewrite(proto, name, set(ins) | set(outs), store)
        onnx.save_model(proto, str(out_dir / file))
        blocks.append(BlockInfo(name, file, list(ins), list(outs), _count_params(module)))

    def emit(name: str, file: str, module: nn.Module, args, ins, outs, axes, fold=True) -> None:  # noqa: ANN001
        if progress:
            progress(name)
        # torch.onnx.export restores the wrapper's training flag recursively afterwards; a fresh
        # wrapper is in training mode, which would switch dropout on in the wrapped model.
        module.eval()
        save(name, file, _export_module(module, args, ins, outs, axes, fold), ins, outs, module)

    try:
        with torch.no_grad():
            embed_args = (ids, positions) if spec.embed_uses_positions else (ids,)
            embed_ins = ["input_ids", "position_ids"] if spec.embed_uses_positions else ["input_ids"]
            emit("embed", "embed.onnx", spec.embed(model), embed_args, embed_ins, ["h0"],
                 {n: batch_seq for n in embed_ins} | {"h0": batch_seq})
            for i in range(shapes.num_layers):
                if rotary is not None:
                    name = f"layer.{i}"
                    if progress:
                        progress(name)
                    proto = fused.exact_layer(model, spec, i, shapes, rotary[i], OPSET)
                    save(name, f"layer_{i}.onnx", proto, [v.name for v in proto.graph.input],
                         [v.name for v in proto.graph.output], spec.layer(model, i))
                    continue
                ins = [f"h{i}"]
                args: list[torch.Tensor] = [hidden]
                if spec.layer_uses_positions:
                    ins.append("position_ids")
                    args.append(positions)
                ins += ["attention_mask", f"past_key.{i}", f"past_value.{i}"]
                args += [mask, past, past]
                outs = [f"h{i + 1}", f"present_key.{i}", f"present_value.{i}"]
                kv_past = {0: "batch", 2: "past_len"}
                kv_total = {0: "batch", 2: "total_len"}
                axes = {
                    f"h{i}": batch_seq, "position_ids": batch_seq, f"h{i + 1}": batch_seq,
                    "attention_mask": {0: "batch", 2: "seq", 3: "total_len"},
                    f"past_key.{i}": kv_past, f"past_value.{i}": kv_past,
                    f"present_key.{i}": kv_total, f"present_value.{i}": kv_total,
                }
                emit(f"layer.{i}", f"layer_{i}.onnx", spec.layer(model, i), tuple(args), ins, outs,
                     {k: v for k, v in axes.items() if k in ins or k in outs})
            last = f"h{shapes.num_layers}"
            if rotary is not None:  # built from the weights: no trace or serialisation of the big table
                for name, last_only in (("head", False), ("head_last", True)):
                    if progress:
                        progress(name)
                    proto = fused.head_proto(model, spec, shapes, last_only, OPSET)
                    save(name, f"{name}.onnx", proto, [last], ["logits"], spec.head(model, last_only))
                return blocks
            # No constant folding for the head: folding would store a transposed copy of a tied
            # embedding matrix instead of sharing the embedding's initializer.
            emit("head", "head.onnx", spec.head(model, False), (hidden,), [last], ["logits"],
                 {last: batch_seq, "logits": batch_seq}, fold=False)
            emit("head_last", "head_last.onnx", spec.head(model, True), (hidden,), [last], ["logits"],
                 {last: batch_seq, "logits": {0: "batch"}}, fold=False)
    finally:
        store.close()
    return blocks
