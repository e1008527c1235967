"""Folding a QDQ graph's weights: what torch's ONNX exporter writes for fake-quantized
layers (``qat``) becomes what ONNX Runtime's own static quantizer writes, int8 weight
initializers (transposes folded in) and int32 biases, so the file holds integers and
ONNX Runtime fuses the layers into its integer kernels."""

from __future__ import annotations

from typing import Any


def fold_weights(graph: Any) -> Any:
    """``graph`` with every QuantizeLinear of a constant (a weight) replaced by the int8
    tensor it computes, weight transposes folded into the int8 tensors, and the float
    biases of Gemm and Conv with quantized inputs made int32 (as ONNX Runtime's quantizer
    writes them); float weights no node reads any more are dropped."""
    import numpy as np
    from onnx import helper, numpy_helper

    from compressor_frontends.pytorch.onnx_graph import constants_to_initializers

    constants_to_initializers(graph)
    nodes = graph.graph.node
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.graph.initializer}
    for node in nodes:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:  # the exporter's shared zero points
            values[node.output[0]] = values[node.input[0]]
    added: dict[str, Any] = {}
    renamed: dict[str, str] = {}
    removed: set[int] = set()
    bias_nodes: list[Any] = []
    for index, node in enumerate(nodes):
        if node.op_type != "QuantizeLinear" or not all(name in values for name in node.input[:3]):
            continue
        weight, scale, zero_point = (values[name] for name in node.input[:3])
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zero_point.dtype)
        rounded = np.round(weight / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.int32)
        name = f"{node.input[0]}_quantized"
        added[name] = np.clip(rounded, info.min, info.max).astype(zero_point.dtype)
        renamed[node.output[0]] = name
        removed.add(index)
    for node in nodes:
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {output: node for node in nodes for output in node.output}
    for index, node in enumerate(nodes):
        source = producers.get(node.input[0]) if node.op_type == "Transpose" else None
        if source is None or source.op_type != "DequantizeLinear" or source.input[0] not in added \
                or len(consumers.get(source.output[0], [])) != 1:
            continue
        perm = next(list(attribute.ints) for attribute in node.attribute if attribute.name == "perm")
        quantized = source.input[0]
        added[quantized] = np.transpose(added[quantized], perm)
        axis = next((attribute for attribute in source.attribute if attribute.name == "axis"), None)
        if axis is not None:
            axis.i = perm.index(axis.i if axis.i >= 0 else axis.i + len(perm))
        source.output[0] = node.output[0]
        removed.add(index)
    for node in nodes:
        if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2] in values:
            bias_name = node.input[2]
            scales = [_dequantized_scale(producers.get(name), values) for name in node.input[:2]]
            if any(scale is None for scale in scales) or len(consumers[bias_name]) != 1:
                continue
            bias_scale = (scales[0] * scales[1]).astype(np.float32).reshape(-1) * np.ones(len(values[bias_name]),
                                                                                         np.float32)
            quantized = f"{bias_name}_quantized"
            added[quantized] = np.round(values[bias_name] / bias_scale).astype(np.int32)
            added[f"{quantized}_scale"] = bias_scale
            added[f"{quantized}_zero_point"] = np.zeros(len(bias_scale), np.int32)
            bias_nodes.append(helper.make_node("DequantizeLinear", [quantized, f"{quantized}_scale",
                                                               f"{quantized}_zero_point"],
                                          [f"{bias_name}_dequantized"], name=f"{bias_name}_DequantizeLinear",
                                          axis=0))
            node.input[2] = f"{bias_name}_dequantized"
    # The new DequantizeLinear nodes read initializers only: first is a topological order.
    kept = [*bias_nodes, *(node for index, node in enumerate(nodes) if index not in removed)]
    del nodes[:]
    nodes.extend(kept)
    graph.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in added.items())
    used = {name for node in nodes for name in node.input} | {output.name for output in graph.graph.output}
    unused = [tensor for tensor in graph.graph.initializer if tensor.name not in used]
    for tensor in unused:
        graph.graph.initializer.remove(tensor)
    return graph


def _dequantized_scale(node: Any, values: dict[str, Any]) -> Any | None:
    """The scale of a DequantizeLinear node (None for any other producer)."""
    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in values:
        return None
    return values[node.input[1]]
