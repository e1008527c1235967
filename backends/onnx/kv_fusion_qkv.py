"""One MatMul for each fused layer's query, key and value projections (issue 27).

After :func:`compressor_onnx.kv_fusion.fuse_attention`, a layer's ``GroupQueryAttention``
reads three projections of the same normalized input: three MatMuls (each with its bias Add
in Qwen2). This pass concatenates their weights (and biases) along the output axis into one
MatMul (and one Add) and splits its output back into the three values the rotary embeddings
and the attention read: at batch 1 a decode step then runs one weight-streaming kernel
instead of three, as ONNX Runtime GenAI's model builder's packed QKV does (the builder feeds
the packed value to the attention, whose own rotary embedding cannot take compressor's
``position_ids`` (left padding); the Split keeps the separate ``RotaryEmbedding`` nodes). The
packed weight holds exactly the three weights' values: the bytes a token reads are the same.

The projections' weights must be float32 initializers, each read by its MatMul alone. In an
export written with external data (a large model, fused on disk) they are read from its
folder and the packed weights written there, one layer at a time, to a data file of their
own (:data:`PACKED_DATA` + ``.data``); the three weights' bytes stay unread in the export's
own data file until the scratch folder is removed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor_onnx.kv_fusion import _Graph, splice

_MS = "com.microsoft"
_FLOAT = 1  # TensorProto.FLOAT
#: The file, beside a graph with external data, that holds its packed weights.
PACKED_DATA = "compressor-qkv.onnx"


@dataclass(frozen=True)
class _Projection:
    """``output = input @ weight (+ bias)``: the MatMul (and bias Add) that make a GQA input."""

    input: str
    weight: Any
    bias: Any | None
    output: str
    nodes: tuple[Any, ...]
    initializers: tuple[str, ...]
    external: bool


def pack_projections(model: Any, folder: Path | None = None) -> int:
    """Pack the query, key and value projections of every fused attention layer of ``model``
    (changed in place) into one MatMul; returns how many layers were packed. ``folder``: where
    the graph's external data is (None: weights stored outside the graph are not packed)."""
    from compressor_onnx.external import DataWriter

    graph = model.graph
    view = _Graph(graph)
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        return 0  # Split takes its sizes as an input from opset 13
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention" and node.domain == _MS
                 and node.name.startswith("/compressor/fused/")]
    replaced: set[int] = set()
    dropped: set[str] = set()
    nodes: list[Any] = []
    tensors: list[Any] = []
    with contextlib.ExitStack() as stack:
        writer: list[DataWriter] = []
        for node in attention:
            projections = [_projection(view, _unrotated(view, name), folder) for name in node.input[:3]]
            if any(projection is None for projection in projections):
                continue
            query, key, value = projections
            assert query is not None and key is not None and value is not None
            if len({query.input, key.input, value.input}) != 1 or len({id(p.nodes[0]) for p in (query, key, value)}) \
                    != 3 or len({query.bias is None, key.bias is None, value.bias is None}) != 1:
                continue
            if folder is not None and not writer and any(p.external for p in (query, key, value)):
                writer.append(stack.enter_context(DataWriter(folder / PACKED_DATA)))
            _pack(node.name.removesuffix("/GroupQueryAttention"), (query, key, value), nodes, tensors,
                  writer[0] if writer else None)
            for projection in (query, key, value):
                replaced.update(id(part) for part in projection.nodes)
                dropped.update(projection.initializers)
    if not nodes:
        return 0
    available = {value.name for value in graph.input} | set(view.initializers) | {t.name for t in tensors}
    read = splice(graph, replaced, nodes, available)
    if read is None:
        return 0
    for tensor in [tensor for tensor in graph.initializer if tensor.name in dropped and tensor.name not in read]:
        graph.initializer.remove(tensor)
    graph.initializer.extend(tensors)
    return sum(node.op_type == "Split" for node in nodes)


def _pack(prefix: str, projections: tuple[_Projection, ...], nodes: list[Any], tensors: list[Any],
          writer: Any | None) -> None:
    """Append one layer's packed MatMul (bias Add) and Split to ``nodes``, its weights to
    ``tensors`` (their bytes to ``writer``'s file, where given: one layer's in memory at a time)."""
    import numpy as np
    from onnx import helper, numpy_helper

    weight = np.concatenate([p.weight for p in projections], axis=1)
    tensors.append(numpy_helper.from_array(weight, f"{prefix}/qkv_proj.weight"))
    if writer is not None:
        writer.write_array(tensors[-1], weight)
    packed = f"{prefix}/qkv_proj"
    nodes.append(helper.make_node("MatMul", [projections[0].input, tensors[-1].name], [packed], name=packed))
    if projections[0].bias is not None:
        bias = np.concatenate([p.bias for p in projections])
        tensors.append(numpy_helper.from_array(bias, f"{prefix}/qkv_proj.bias"))
        nodes.append(helper.make_node("Add", [packed, tensors[-1].name], [f"{packed}_biased"], name=f"{packed}_bias"))
        packed = f"{packed}_biased"
    # The widths in a Constant node, as the exporter writes shapes: no initializer, so not
    # counted among the weights a token reads (kv_runtime.streamed_weight_bytes).
    widths = np.array([p.weight.shape[1] for p in projections], np.int64)
    nodes.append(helper.make_node("Constant", [], [f"{prefix}/qkv_widths"], name=f"{prefix}/qkv_widths",
                                  value=numpy_helper.from_array(widths)))
    nodes.append(helper.make_node("Split", [packed, f"{prefix}/qkv_widths"], [p.output for p in projections],
                                  name=f"{prefix}/qkv_split", axis=-1))


def _unrotated(view: _Graph, name: str) -> str:
    """The projection a GQA input was rotated from (``name`` itself where it was not)."""
    node = view.producer.get(name)
    if node is not None and node.op_type == "RotaryEmbedding" and node.domain == _MS:
        return node.input[0]
    return name


def _projection(view: _Graph, name: str, folder: Path | None) -> _Projection | None:
    """``name`` as ``input @ weight (+ bias)``, read only by one rotary embedding or attention;
    None where it is made otherwise or its weights are shared or not in the graph."""
    from compressor_onnx.external import is_external

    if len(view.consumers.get(name, [])) != 1 or name in view.outputs:
        return None
    node = view.producer.get(name)
    bias, bias_name, nodes = None, None, []
    if node is not None and node.op_type == "Add" and len(node.input) == 2:
        made = [value for value in node.input if (maker := view.producer.get(value)) is not None
                and maker.op_type == "MatMul"]
        others = [value for value in node.input if value not in made]
        if len(made) != 1 or len(others) != 1 or len(view.consumers.get(made[0], [])) != 1:
            return None
        bias_name = others[0]
        bias = _vector(view, bias_name, folder)
        if bias is None:
            return None
        nodes.append(node)
        node = view.producer[made[0]]
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    weight_name = node.input[1]
    tensor = view.initializers.get(weight_name)
    if tensor is None or tensor.data_type != _FLOAT or len(tensor.dims) != 2 \
            or len(view.consumers.get(weight_name, [])) != 1:
        return None
    weight = _array(view, weight_name, folder)
    if weight is None or (bias is not None and bias.shape[0] != weight.shape[1]):
        return None
    owned = (weight_name, *((bias_name,) if bias_name in view.initializers else ()))
    return _Projection(node.input[0], weight, bias, name, (node, *nodes), owned, is_external(tensor))


def _vector(view: _Graph, name: str, folder: Path | None) -> Any | None:
    """The float32 vector constant ``name`` holds (through identities), or None."""
    while (node := view.producer.get(name)) is not None and node.op_type == "Identity":
        name = node.input[0]
    value = _array(view, name, folder)
    return value if value is not None and value.ndim == 1 and value.dtype.name == "float32" else None


def _array(view: _Graph, name: str, folder: Path | None) -> Any | None:
    """The constant ``name`` holds, external data read from ``folder``; None where unknown."""
    from compressor_onnx.external import is_external, read_array

    tensor = view.initializers.get(name)
    if tensor is not None and is_external(tensor):
        return read_array(tensor, folder) if folder is not None else None
    return view.constant(name)
