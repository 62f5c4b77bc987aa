"""Compose per-block ONNX graphs into one range graph, without the `onnx` package.

The exporter writes one small ONNX model per block (embeddings, each decoder layer, the head);
their weights live in one shared external-data file. Any contiguous range of blocks is then one
fused graph, so ONNX Runtime runs it as a single session (one thread pool, whole-graph
optimisation) while the weights on disk stay stored once.

The client install does not carry the `onnx` package, so this works on the protobuf wire format
directly. Protobuf concatenation semantics make it simple: a repeated field is a sequence of
independent (tag, length, bytes) records, so nodes and initializers of several graphs can be
copied record by record into one GraphProto. Block value names are unique by construction (the
exporter prefixes them), initializers are named by content hash so shared weights (a tied
embedding) collapse into one, and a block output that a later block consumes becomes internal.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from splitllm.errors import BundleCorrupt

# Field numbers from onnx.proto3.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INIT, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 1, 2, 5, 11, 12, 13
_VALUE_INFO_NAME = 1
_TENSOR_NAME = 8

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise BundleCorrupt("truncated or invalid varint in an ONNX graph")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """Yield (field number, wire type, payload, whole raw record) for each top-level field."""
    pos = 0
    end = len(buf)
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            _, pos = _read_varint(buf, pos)
            payload = b""
        elif wire == _WIRE_I64:
            pos += 8
            payload = b""
        elif wire == _WIRE_I32:
            pos += 4
            payload = b""
        elif wire == _WIRE_LEN:
            length, pos = _read_varint(buf, pos)
            payload = buf[pos : pos + length]
            pos += length
        else:
            raise BundleCorrupt(f"unsupported protobuf wire type {wire} in an ONNX graph")
        if pos > end:
            raise BundleCorrupt("truncated field in an ONNX graph")
        yield field, wire, payload, buf[start:pos]


def _name_of(message: bytes, name_field: int) -> str:
    for field, wire, payload, _ in _fields(message):
        if field == name_field and wire == _WIRE_LEN:
            return payload.decode("utf-8")
    raise BundleCorrupt("an ONNX value or tensor has no name")


def _record(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | _WIRE_LEN) + _varint(len(payload)) + payload


def compose(models: Sequence[bytes], name: str = "splitllm_range") -> bytes:
    """Fuse serialized ONNX models, in execution order, into one serialized model.

    Graph inputs are the blocks' inputs that no earlier block produces (shared inputs such as
    ``position_ids`` appear once); graph outputs are the blocks' outputs that no later block
    consumes. Model-level fields (IR version, opsets) come from the first model.
    """
    if not models:
        raise ValueError("compose needs at least one model")
    header = b""
    graphs: list[bytes] = []
    for index, model in enumerate(models):
        graph = None
        for field, _wire, payload, raw in _fields(model):
            if field == _MODEL_GRAPH:
                graph = payload
            elif index == 0:
                header += raw
        if graph is None:
            raise BundleCorrupt("an ONNX block has no graph")
        graphs.append(graph)

    nodes: list[bytes] = []
    inits: dict[str, bytes] = {}
    value_infos: dict[str, bytes] = {}
    per_block_inputs: list[list[tuple[str, bytes]]] = []
    per_block_outputs: list[list[tuple[str, bytes]]] = []
    for graph in graphs:
        ins: list[tuple[str, bytes]] = []
        outs: list[tuple[str, bytes]] = []
        for field, _wire, payload, raw in _fields(graph):
            if field == _GRAPH_NODE:
                nodes.append(raw)
            elif field == _GRAPH_INIT:
                inits.setdefault(_name_of(payload, _TENSOR_NAME), raw)
            elif field == _GRAPH_VALUE_INFO:
                value_infos.setdefault(_name_of(payload, _VALUE_INFO_NAME), raw)
            elif field == _GRAPH_INPUT:
                ins.append((_name_of(payload, _VALUE_INFO_NAME), raw))
            elif field == _GRAPH_OUTPUT:
                outs.append((_name_of(payload, _VALUE_INFO_NAME), raw))
        per_block_inputs.append(ins)
        per_block_outputs.append(outs)

    graph_inputs: dict[str, bytes] = {}
    produced: set[str] = set()
    for ins, outs in zip(per_block_inputs, per_block_outputs, strict=True):
        for input_name, raw in ins:
            if input_name not in produced and input_name not in inits:
                graph_inputs.setdefault(input_name, raw)
        produced.update(n for n, _ in outs)
    graph_outputs: list[bytes] = []
    for index, outs in enumerate(per_block_outputs):
        consumed_later = {n for ins in per_block_inputs[index + 1 :] for n, _ in ins}
        graph_outputs.extend(raw for out_name, raw in outs if out_name not in consumed_later)

    body = b"".join(nodes) + _record(_GRAPH_NAME, name.encode())
    body += b"".join(inits.values())
    body += b"".join(graph_inputs.values()) + b"".join(graph_outputs)
    body += b"".join(value_infos.values())
    return header + _record(_MODEL_GRAPH, body)
