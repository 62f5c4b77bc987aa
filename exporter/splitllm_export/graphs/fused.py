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

The registry entry's :class:`~splitllm_export.graphs.arch.DecoderLayout` maps a family onto this form:
packed or separate projections (with biases), q/k RMSNorm (a SimplifiedLayerNormalization over
each head, then separate q, k, v into GroupQueryAttention), extra norms around attention and MLP
(Gemma 3), a SiLU or tanh-GELU gate, the rotary tables of each layer (Gemma 3's local layers
have their own base), and a sliding window (GroupQueryAttention's ``local_window_size`` set to
the model's window W: transformers lets a query see keys at distance < W, and ORT 1.32 gives the
same result with W; W - 1 does not, checked by the tiny Mistral, Phi-3 and Gemma 3 exports). Only layers the fused
form reproduces are fused (full-width rotary with the default or linear/llama3 frequency rules);
anything else keeps the rewritten exported graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from splitllm.model.bundle import ModelShapes
from splitllm_export.graphs.arch import ArchSpec, DecoderLayout
from splitllm_export.graphs.onnx_util import MS_DOMAIN, GraphBuilder

SHARED_INPUTS = ("seqlens_k", "total_seq_len")
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_ROPE_TYPES = ("default", "linear", "llama3")

Tables = tuple[np.ndarray, np.ndarray]


def _activation(config: Any) -> str:
    return str(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu"))


def fusable(model: Any, spec: ArchSpec) -> str | None:
    """None when ``model``'s layers can be fused, else why not (kept in the manifest)."""
    cfg = model.config
    if spec.layout is None or not spec.fused:
        return f"family {spec.family!r} has no fused layer"
    if _activation(cfg) not in _ACTIVATIONS:
        return f"activation {_activation(cfg)!r} is not one of {', '.join(_ACTIVATIONS)}"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for index in range(cfg.num_hidden_layers):
        rotary = spec.layout.rotary(model, index)
        if rotary is None or getattr(rotary, "rope_type", "default") not in _ROPE_TYPES:
            return f"rotary type {getattr(rotary, 'rope_type', None)!r}"
        if 2 * int(rotary.inv_freq.shape[0]) != head_dim:
            return "partial rotary (not every head dimension turns)"
    return None


def _table(rotary: Any, shapes: ModelShapes) -> Tables:
    import torch

    positions = torch.arange(shapes.max_context, dtype=torch.int64)[None, :]
    probe = torch.zeros(1, 1, shapes.head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)  # (1, P, D), halves repeated
    half = shapes.head_dim // 2
    cos, sin = cos[0].numpy(), sin[0].numpy()
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise ValueError("rotary tables are not two repeated halves")
    return np.ascontiguousarray(cos[:, :half], dtype=np.float32), np.ascontiguousarray(sin[:, :half], dtype=np.float32)


def rotary_tables(model: Any, spec: ArchSpec, shapes: ModelShapes) -> list[Tables]:
    """cos, sin (max_context, head_dim / 2) for each layer, from the model's own rotary modules."""
    if spec.layout is None:
        raise ValueError(f"family {spec.family!r} has no decoder layout")
    by_module: dict[int, Tables] = {}
    tables = []
    for index in range(shapes.num_layers):
        rotary = spec.layout.rotary(model, index)
        if id(rotary) not in by_module:
            by_module[id(rotary)] = _table(rotary, shapes)
        tables.append(by_module[id(rotary)])
    return tables


def _kn(linear: Any) -> np.ndarray:
    """A torch Linear's weight as (in, out) float32."""
    return np.ascontiguousarray(linear.weight.detach().float().numpy().T)


def _bias(linear: Any) -> np.ndarray | None:
    bias = getattr(linear, "bias", None)
    return None if bias is None else bias.detach().float().numpy()


def _eps(norm: Any) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def linear_count(layout: DecoderLayout) -> int:
    """Weight matrices of one fused layer (for the variant's statistics)."""
    return len(layout.qkv) + 1 + len(layout.gate_up) + 1


def fused_layer(b: GraphBuilder, model: Any, spec: ArchSpec, index: int, shapes: ModelShapes, tables: Tables,
                bits: int | None) -> None:
    """Append layer ``index``'s fused nodes to the builder ``b``.

    Reads graph inputs h{i}, seqlens_k, total_seq_len, past_key.{i}, past_value.{i} and writes
    h{i+1}, present_key.{i}, present_value.{i}. ``tables`` are this layer's rotary cos, sin.
    """
    layout = spec.layout
    if layout is None:
        raise ValueError(f"family {spec.family!r} has no decoder layout")
    cfg = model.config
    layer = model.model.layers[index]
    attn, mlp = layer.self_attn, layer.mlp
    h_in, h_out = f"h{index}", f"h{index + 1}"

    def linear(a: str, modules: list[Any]) -> str:
        w = np.concatenate([_kn(m) for m in modules], axis=1)
        out = b.name("linear")
        b.linear(a, w, out, bits)
        biases = [_bias(m) for m in modules]
        if any(x is not None for x in biases):
            full = np.concatenate([x if x is not None else np.zeros(m.out_features, np.float32)
                                   for x, m in zip(biases, modules, strict=True)])
            out = b.node("Add", [out, b.tensor(full.astype(np.float32))])
        return out

    def norm(x: str, module: Any, out: str | None = None) -> str:
        weight = b.tensor(np.ascontiguousarray(layout.norm_weight(module), dtype=np.float32))
        return b.node("SimplifiedLayerNormalization", [x, weight], [out] if out else None,
                      axis=-1, epsilon=_eps(module), stash_type=1)

    def head_norm(x: str, module: Any, heads: int) -> str:
        """RMSNorm over each head's D values: (B, T, N*D) -> (B, T, N, D) -> norm -> back."""
        split = b.node("Reshape", [x, b.tensor(np.array([0, 0, heads, shapes.head_dim], dtype=np.int64))])
        return b.node("Reshape", [norm(split, module), b.tensor(np.array([0, 0, heads * shapes.head_dim],
                                                                         dtype=np.int64))])

    x1 = norm(h_in, getattr(layer, layout.input_norm))
    projections = [getattr(attn, n) for n in layout.qkv]
    qkv = linear(x1, projections)
    q_width, kv_width = shapes.num_heads * shapes.head_dim, shapes.num_kv_heads * shapes.head_dim
    if layout.qk_norm is None:
        qkv_inputs = [qkv, "", ""]
    else:
        q, k, v = b.name("q"), b.name("k"), b.name("v")
        b.node("Split", [qkv, b.tensor(np.array([q_width, kv_width, kv_width], dtype=np.int64))], [q, k, v], axis=-1)
        qkv_inputs = [head_norm(q, getattr(attn, layout.qk_norm[0]), shapes.num_heads),
                      head_norm(k, getattr(attn, layout.qk_norm[1]), shapes.num_kv_heads), v]
    cos, sin = (b.tensor(t) for t in tables)
    attrs: dict[str, Any] = {"num_heads": shapes.num_heads, "kv_num_heads": shapes.num_kv_heads, "do_rotary": 1,
                             "rotary_interleaved": 0,
                             "scale": float(getattr(attn, "scaling", None) or shapes.head_dim**-0.5)}
    window = layout.window(cfg, index)
    if window is not None:
        attrs["local_window_size"] = int(window)
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if softcap:
        attrs["softcap"] = float(softcap)
    context = b.name("attention")
    b.node("GroupQueryAttention",
           [*qkv_inputs, f"past_key.{index}", f"past_value.{index}", "seqlens_k", "total_seq_len", cos, sin],
           [context, f"present_key.{index}", f"present_value.{index}"], **attrs)
    projected = linear(context, [getattr(attn, layout.o_proj)])
    if layout.attn_out_norm is not None:
        projected = norm(projected, getattr(layer, layout.attn_out_norm))
    pre_mlp = getattr(layer, layout.mlp_in_norm)
    x2, h2 = b.name("x2"), b.name("h2")
    b.node("SkipSimplifiedLayerNormalization",
           [projected, h_in, b.tensor(np.ascontiguousarray(layout.norm_weight(pre_mlp), dtype=np.float32))],
           [x2, "", "", h2], epsilon=_eps(pre_mlp))
    gate_up = linear(x2, [getattr(mlp, n) for n in layout.gate_up])
    gate, up = b.name("gate"), b.name("up")
    width = cfg.intermediate_size
    b.node("Split", [gate_up, b.tensor(np.array([width, width], dtype=np.int64))], [gate, up], axis=-1)
    if _activation(cfg) == "silu":
        activated = b.node("Mul", [gate, b.node("Sigmoid", [gate])])
    else:  # gelu_pytorch_tanh: FastGelu is the same tanh formula
        activated = b.node("FastGelu", [gate])
    down = linear(b.node("Mul", [activated, up]), [getattr(mlp, layout.down)])
    if layout.mlp_out_norm is not None:
        down = norm(down, getattr(layer, layout.mlp_out_norm))
    b.node("Add", [h2, down], [h_out])


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


class Fp32Builder(GraphBuilder):
    """One exact fp32 fused layer: ``linear`` is a plain fp32 MatMul."""

    def linear(self, a: str, w_kn: np.ndarray, out: str, bits: int | None) -> None:
        self.node("MatMul", [a, self.tensor(np.ascontiguousarray(w_kn, dtype=np.float32))], [out])


def exact_layer(model: Any, spec: ArchSpec, index: int, shapes: ModelShapes, tables: Tables,
                opset: int) -> onnx.ModelProto:
    """Layer ``index`` as an fp32 fused block, initializers inline (the exporter moves big ones out)."""
    template = helper.make_model(helper.make_graph([], "t", [], []),
                                 opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
    proto = layer_proto(index, shapes, template)
    builder = Fp32Builder(f"fused{index}")
    fused_layer(builder, model, spec, index, shapes, tables, None)
    proto.graph.node.extend(builder.nodes)
    proto.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in builder.new_tensors.items())
    return proto


def head_proto(model: Any, spec: ArchSpec, shapes: ModelShapes, last_only: bool, opset: int) -> onnx.ModelProto:
    """The head (final RMSNorm, LM head, final softcap) built from the weights, as the exported head computes it.

    Input ``h{L}`` (B, T, H), output ``logits`` (B, T, V), or (B, 1, V) for ``last_only``. The
    LM head is a Gemm with transB=1 on the stored (V, H) matrix, as in the exported head, so a tied
    table keeps sharing the embedding's initializer. Exporting the head from PyTorch serialises
    that table through the tracer twice (about 50 s for Qwen2.5-0.5B's 151,936 x 896 on the test
    machine); building it takes the time of hashing it.
    """
    layout = spec.layout
    if layout is None:
        raise ValueError(f"family {spec.family!r} has no decoder layout")
    hidden, vocab = shapes.hidden_size, shapes.vocab_size
    f32 = TensorProto.FLOAT
    last = f"h{shapes.num_layers}"
    out_dims: list[Any] = ["batch", 1 if last_only else "seq", vocab]
    graph = helper.make_graph([], "head_last" if last_only else "head",
                              [helper.make_tensor_value_info(last, f32, ["batch", "seq", hidden])],
                              [helper.make_tensor_value_info("logits", f32, out_dims)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
    b = Fp32Builder("head_last" if last_only else "head")
    x = last
    if last_only:
        x = b.node("Slice", [x, b.tensor(np.array([-1], dtype=np.int64)),
                             b.tensor(np.array([np.iinfo(np.int64).max], dtype=np.int64)),
                             b.tensor(np.array([1], dtype=np.int64))])
    norm = model.model.norm
    x = b.node("SimplifiedLayerNormalization",
               [x, b.tensor(np.ascontiguousarray(layout.norm_weight(norm), dtype=np.float32))],
               axis=-1, epsilon=_eps(norm), stash_type=1)
    flat = b.node("Reshape", [x, b.tensor(np.array([-1, hidden], dtype=np.int64))])
    head = model.lm_head
    weight = np.ascontiguousarray(head.weight.detach().float().numpy())  # (V, H)
    bias = _bias(head)
    bias = np.zeros(vocab, dtype=np.float32) if bias is None else bias.astype(np.float32)
    logits = b.node("Gemm", [flat, b.tensor(weight), b.tensor(bias)], transB=1)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        cap = b.tensor(np.array(softcap, dtype=np.float32))
        logits = b.node("Mul", [b.node("Tanh", [b.node("Div", [logits, cap])]), cap])
    shape = b.node("Concat", [b.node("Shape", [x], end=2), b.tensor(np.array([vocab], dtype=np.int64))], axis=0)
    b.node("Reshape", [logits, shape], ["logits"])
    proto.graph.node.extend(b.nodes)
    proto.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in b.new_tensors.items())
    return proto
