"""Fused decoder layers: ONNX Runtime's contrib kernels, ~25 nodes a layer instead of ~175.

A layer exported from PyTorch is ~175 ONNX nodes, most of them shape arithmetic (Shape, Gather,
Unsqueeze, Concat, Reshape) and the rotary and mask subgraphs. At one token per step each node
costs a few microseconds of dispatch whatever it computes, so on SmolLM2 that bookkeeping was
more of a decode step than the matrix products (``benchmarks/step_profile.py``). A Llama-family
layer is therefore built directly from the model's weights with the kernels ONNX Runtime ships
for this, both for the exact fp32 blocks (``linear`` a plain fp32 MatMul; export validation
checks them against transformers at every split like any block) and for device variants:

    x1      = SimplifiedLayerNormalization(h, input_layernorm)
    qkv     = linear(x1, [Wq | Wk | Wv])                 packed, one kernel call
    a, K, V = GroupQueryAttention(qkv, past K/V, seqlens_k, total_seq_len, cos, sin)
                                                         rotary, causal mask, KV append inside
    x2, h2  = SkipSimplifiedLayerNormalization(linear(a, Wo), h, post_attention_layernorm)
    g, u    = Split(linear(x2, [Wgate | Wup]))
    out     = h2 + linear(silu(g) * u, Wdown)

``linear`` is the block's matrix product: fp32 MatMul for the exact blocks, the variant's format
for device variants (quantize.py: MatMulNBits with the Q4_1 block correction, or an fp16 weight). The block's interface differs from the fp32 layer in two graph
inputs only: ``seqlens_k`` (B,) int32 = total length - 1 and ``total_seq_len`` () int32 replace
``position_ids`` and ``attention_mask``; the runtime feeds whichever a composed range declares.
The KV cache holds rotated keys in (B, KV, P, D), exactly what the fp32 blocks hold, so a cache
moves between a fused device prefix and fp32 server layers unchanged.

Only layers the fused form reproduces are fused (Llama family, SiLU MLP, full-width rotary with
the default or linear/llama3 frequency rules, no sliding window); anything else keeps the
rewritten exported graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from splitllm.model.bundle import ModelShapes
from splitllm_export.blocks import _tensor_digest

SHARED_INPUTS = ("seqlens_k", "total_seq_len")
MS_OPS = frozenset({"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"})
MS_DOMAIN = "com.microsoft"


def fusable(model: Any, family: str) -> str | None:
    """None when ``model``'s layers can be fused, else why not (kept in the manifest)."""
    cfg = model.config
    if family != "llama":
        return f"family {family!r} has no fused layer"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in ("default", "linear", "llama3"):
        return f"rotary type {getattr(rotary, 'rope_type', None)!r}"
    return None


def rotary_tables(model: Any, shapes: ModelShapes) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_context, head_dim / 2) from the model's own rotary module (scaling included)."""
    import torch

    positions = torch.arange(shapes.max_context, dtype=torch.int64)[None, :]
    probe = torch.zeros(1, 1, shapes.head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(probe, positions)  # (1, P, D), halves repeated
    half = shapes.head_dim // 2
    cos, sin = cos[0].numpy(), sin[0].numpy()
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise ValueError("rotary tables are not two repeated halves")
    return np.ascontiguousarray(cos[:, :half], dtype=np.float32), np.ascontiguousarray(sin[:, :half], dtype=np.float32)


def _kn(linear: Any) -> np.ndarray:
    """A torch Linear's weight as (in, out) float32."""
    return np.ascontiguousarray(linear.weight.detach().float().numpy().T)


def _bias(linear: Any) -> np.ndarray | None:
    bias = getattr(linear, "bias", None)
    return None if bias is None else bias.detach().float().numpy()


def fused_layer(rw: Any, layer: Any, index: int, shapes: ModelShapes, tables: tuple[np.ndarray, np.ndarray],
                bits: int | None) -> None:
    """Append layer ``index``'s fused nodes to the rewriter ``rw`` (quantize._Rewriter).

    Reads graph inputs h{i}, seqlens_k, total_seq_len, past_key.{i}, past_value.{i} and writes
    h{i+1}, present_key.{i}, present_value.{i}.
    """
    attn, mlp = layer.self_attn, layer.mlp
    h_in, h_out = f"h{index}", f"h{index + 1}"

    def linear(a: str, modules: list[Any]) -> str:
        w = np.concatenate([_kn(m) for m in modules], axis=1)
        out = rw._name("linear")
        rw._linear(a, w, out, bits)
        biases = [_bias(m) for m in modules]
        if any(b is not None for b in biases):
            full = np.concatenate([b if b is not None else np.zeros(m.out_features, np.float32)
                                   for b, m in zip(biases, modules, strict=True)])
            out = rw._node("Add", [out, rw._tensor(full.astype(np.float32))])
        return out

    def norm_weight(module: Any) -> str:
        return rw._tensor(module.weight.detach().float().numpy())

    x1 = rw._node("SimplifiedLayerNormalization", [h_in, norm_weight(layer.input_layernorm)],
                  axis=-1, epsilon=float(layer.input_layernorm.variance_epsilon), stash_type=1)
    qkv = linear(x1, [attn.q_proj, attn.k_proj, attn.v_proj])
    cos, sin = (rw._tensor(t) for t in tables)
    scale = float(getattr(attn, "scaling", shapes.head_dim**-0.5))
    context = rw._name("attention")
    rw._node("GroupQueryAttention",
             [qkv, "", "", f"past_key.{index}", f"past_value.{index}", "seqlens_k", "total_seq_len", cos, sin],
             [context, f"present_key.{index}", f"present_value.{index}"],
             num_heads=shapes.num_heads, kv_num_heads=shapes.num_kv_heads, do_rotary=1, rotary_interleaved=0,
             scale=scale)
    projected = linear(context, [attn.o_proj])
    post = layer.post_attention_layernorm
    x2, h2 = rw._name("x2"), rw._name("h2")
    rw._node("SkipSimplifiedLayerNormalization", [projected, h_in, norm_weight(post)], [x2, "", "", h2],
             epsilon=float(post.variance_epsilon))
    gate_up = linear(x2, [mlp.gate_proj, mlp.up_proj])
    gate, up = rw._name("gate"), rw._name("up")
    width = mlp.gate_proj.out_features
    rw._node("Split", [gate_up, rw._tensor(np.array([width, width], dtype=np.int64))], [gate, up], axis=-1)
    act = rw._node("Mul", [rw._node("Mul", [gate, rw._node("Sigmoid", [gate])]), up])
    rw._node("Add", [h2, linear(act, [mlp.down_proj])], [h_out])


def layer_proto(index: int, shapes: ModelShapes, template: onnx.ModelProto) -> onnx.ModelProto:
    """An empty model with layer ``index``'s fused interface; IR version and opsets from ``template``."""
    kv, d, hidden = shapes.num_kv_heads, shapes.head_dim, shapes.hidden_size
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info(f"h{index}", f32, ["batch", "seq", hidden]),
        helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
        helper.make_tensor_value_info("total_seq_len", i32, []),
        helper.make_tensor_value_info(f"past_key.{index}", f32, ["batch", kv, "past_len", d]),
        helper.make_tensor_value_info(f"past_value.{index}", f32, ["batch", kv, "past_len", d]),
    ]
    outputs = [
        helper.make_tensor_value_info(f"h{index + 1}", f32, ["batch", "seq", hidden]),
        helper.make_tensor_value_info(f"present_key.{index}", f32, ["batch", kv, "total_len", d]),
        helper.make_tensor_value_info(f"present_value.{index}", f32, ["batch", kv, "total_len", d]),
    ]
    graph = helper.make_graph([], f"layer_{index}_fused", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=list(template.opset_import))
    proto.ir_version = template.ir_version
    return proto


class GraphBuilder:
    """Collects nodes (names under ``prefix``) and new tensors named by their content.

    The node and tensor interface :func:`fused_layer` builds with; quantize's rewriter extends
    it with the variants' weight formats.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.new_tensors: dict[str, np.ndarray] = {}
        self._count = 0

    def _name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}/{what}_{self._count}"

    def _tensor(self, array: np.ndarray) -> str:
        name = f"w_{_tensor_digest(array)[:24]}"
        self.new_tensors[name] = array
        return name

    def _node(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: Any) -> str:
        outs = outputs or [self._name(op)]
        domain = MS_DOMAIN if op in MS_OPS else ""
        self.nodes.append(helper.make_node(op, inputs, outs, name=self._name(op + "_node"), domain=domain, **attrs))
        return outs[0]


class Fp32Builder(GraphBuilder):
    """One exact fp32 fused layer: ``linear`` is a plain fp32 MatMul."""

    def _linear(self, a: str, w_kn: np.ndarray, out: str, bits: int | None) -> None:
        self._node("MatMul", [a, self._tensor(np.ascontiguousarray(w_kn, dtype=np.float32))], [out])


def exact_layer(model: Any, index: int, shapes: ModelShapes, tables: tuple[np.ndarray, np.ndarray],
                opset: int) -> onnx.ModelProto:
    """Layer ``index`` as an fp32 fused block, initializers inline (the exporter moves big ones out)."""
    template = helper.make_model(helper.make_graph([], "t", [], []),
                                 opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
    proto = layer_proto(index, shapes, template)
    builder = Fp32Builder(f"fused{index}")
    fused_layer(builder, model.model.layers[index], index, shapes, tables, None)
    proto.graph.node.extend(builder.nodes)
    proto.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in builder.new_tensors.items())
    return proto
