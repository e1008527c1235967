"""Dynamic int8 quantization of a large model, one weight tensor at a time.

It writes the graph ONNX Runtime's ``quantize_dynamic`` writes for the ops that
hold nearly all of a large model's weights, so small and large models get the
same kind of graph and ONNX Runtime fuses it the same way
(``DynamicQuantizeMatMul``):

* ``Gemm`` (alpha = beta = 1, no transA) becomes ``MatMul`` (+ ``Add`` for the
  bias), its weight transposed when ``transB`` is set, as ONNX Runtime does;
* ``MatMul`` with a float32 initializer as B: ``DynamicQuantizeLinear`` on A,
  int8 symmetric weights (per output channel by default), ``MatMulInteger``,
  ``Cast`` and a ``Mul`` by the product of both scales;
* ``Gather`` on a float32 initializer (embeddings): uint8 asymmetric data and a
  ``DequantizeLinear`` where a consumer needs floats; a ``MatMul`` quantized
  here reads the gathered uint8 values directly.

Other weighted ops (Conv, Attention, LSTM) stay float32 on this path and show
up in the report's ``float_nodes``. Scales and zero points come from ONNX
Runtime's own ``compute_scale_zp``, and values are rounded as its
``quantize_nparray`` does, so weights match the small path's exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from compressor_onnx.external import Producer, read_array

_SUFFIXES = ("", "_quantized", "_scale", "_zero_point")


def quantize_dynamic_int8(
    model: Any, folder: Path, per_channel: bool, excluded_nodes: Iterable[str], op_types: Iterable[str],
    convert_gemm: bool = True, reduce_range: bool = False,
) -> dict[str, Producer]:
    """Rewrite ``model`` (a skeleton, in place); return producers of the new tensors' contents.

    ``convert_gemm=False`` leaves Gemm nodes alone (the static transformer path
    quantizes only embeddings here); ``reduce_range`` quantizes weights to 7 bits
    as ONNX Runtime's ``quantize_dynamic(reduce_range=True)`` does.
    """
    rewriter = _Rewriter(model, folder, per_channel, set(excluded_nodes), set(op_types))
    rewriter.convert_gemm, rewriter.reduce_range = convert_gemm, reduce_range
    rewriter.run()
    return rewriter.producers


class _Rewriter:
    def __init__(
        self, model: Any, folder: Path, per_channel: bool, excluded: set[str], op_types: set[str]
    ) -> None:
        self.model, self.graph, self.folder = model, model.graph, folder
        self.per_channel, self.excluded, self.op_types = per_channel, excluded, op_types
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        self.sources: dict[str, Producer] = {}
        self.producers: dict[str, Producer] = {}
        self.params: dict[str, tuple[Any, Any]] = {}
        #: Float name -> (quantized name, scale name, zero point name).
        self.quantized: dict[str, tuple[str, str, str]] = {}
        self.activations: dict[str, tuple[str, str, str]] = {}
        self.dequantized: set[str] = set()
        self.nodes: list[Any] = []
        self.node_names: set[str] = set()
        self.names = _tensor_names(self.graph)
        self.convert_gemm, self.reduce_range = True, False

    def run(self) -> None:
        from onnxruntime.quantization.quant_utils import __producer__, __version__

        nodes = list(self.graph.node)
        for node in self._without_gemm(nodes) if self.convert_gemm else nodes:
            if self._quantizable(node, "MatMul") and self._float_weight(node.input[1]):
                self._matmul(node)
            elif self._quantizable(node, "Gather") and self._float_weight(node.input[0]):
                self._gather(node)
            else:
                self._dequantize(_used_names(node))
                self._add(node)
        self._dequantize(output.name for output in self.graph.output)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        del self.graph.value_info[:]
        _drop_unused_initializers(self.graph)
        self.model.producer_name, self.model.producer_version = __producer__, __version__

    def _quantizable(self, node: Any, op_type: str) -> bool:
        return (node.op_type == op_type and node.domain in ("", "ai.onnx") and op_type in self.op_types
                and node.name not in self.excluded)

    def _float_weight(self, name: str) -> bool:
        from onnx import TensorProto

        tensor = self.initializers.get(name)
        return tensor is not None and tensor.data_type == TensorProto.FLOAT

    def _add(self, node: Any) -> None:
        self.nodes.append(node)
        self.node_names.add(node.name)

    def _without_gemm(self, nodes: list[Any]) -> list[Any]:
        """Gemm as MatMul (+ Add), exactly where ONNX Runtime's dynamic quantizer replaces it."""
        from onnx import helper

        replaced: list[Any] = []
        transposed: dict[str, str] = {}
        for node in nodes:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or (
                attributes.get("alpha", 1.0), attributes.get("beta", 1.0), attributes.get("transA", 0)
            ) != (1.0, 1.0, 0):
                replaced.append(node)
                continue
            weight = node.input[1]
            if attributes.get("transB", 0) == 1:
                if weight in self.initializers:
                    if weight not in transposed:
                        transposed[weight] = self._transposed_copy(weight)
                    weight = transposed[weight]
                else:
                    name = node.name + "_Transpose" if node.name else ""
                    replaced.append(helper.make_node("Transpose", [weight], [weight + "_Transposed"], name))
                    weight += "_Transposed"
            has_bias = len(node.input) > 2
            product = node.output[0] + ("_MatMul" if has_bias else "")
            replaced.append(helper.make_node(
                "MatMul", [node.input[0], weight], [product], node.name + "_MatMul" if node.name else ""
            ))
            if has_bias:
                replaced.append(helper.make_node(
                    "Add", [product, node.input[2]], list(node.output), node.name + "_Add" if node.name else ""
                ))
        return replaced

    def _transposed_copy(self, name: str) -> str:
        from onnx import TensorProto

        new_name, suffix = name + "_Transposed", 0
        while any(new_name + s in self.names for s in _SUFFIXES):
            suffix += 1
            new_name = f"{name}_Transposed_{suffix}"
        self.names.update(new_name + s for s in _SUFFIXES)
        source = self.initializers[name]
        tensor = TensorProto(name=new_name, data_type=source.data_type, dims=list(reversed(source.dims)))
        self.graph.initializer.append(tensor)
        self.initializers[new_name] = tensor
        self.sources[new_name] = lambda: self._read(name).T
        self.producers[new_name] = self.sources[new_name]
        return new_name

    def _read(self, name: str) -> Any:
        if name in self.sources:
            return self.sources[name]()
        return read_array(self.initializers[name], self.folder)

    def _matmul(self, node: Any) -> None:
        from onnx import TensorProto, helper

        activation, weight, output = node.input[0], node.input[1], node.output[0]
        if activation in self.quantized:
            x_q, x_scale, x_zero = self.quantized[activation]
        elif activation in self.initializers:
            x_q, x_scale, x_zero = self._quantize_weight(activation, TensorProto.UINT8, None)
        else:
            x_q, x_scale, x_zero = self._activation(activation)
        w_q, w_scale, w_zero = self._quantize_weight(
            weight, TensorProto.INT8, -1 if self.per_channel else None
        )
        name = node.name + "_quant" if node.name else ""
        scales_name = name + "_scales_mul" if name else f"{x_scale}_{w_scale}_mul"
        if scales_name not in self.node_names:
            self._add(helper.make_node("Mul", [x_scale, w_scale], [scales_name + ":0"], scales_name))
        integer = output + "_output_quantized"
        self._add(helper.make_node("MatMulInteger", [x_q, w_q, x_zero, w_zero], [integer], name))
        self._add(helper.make_node(
            "Cast", [integer], [integer + "_cast_output"], integer + "_cast", to=TensorProto.FLOAT
        ))
        self._add(helper.make_node(
            "Mul", [integer + "_cast_output", scales_name + ":0"], [output],
            name + "_output_scale_mul" if name else "",
        ))

    def _activation(self, name: str) -> tuple[str, str, str]:
        from onnx import helper

        if name not in self.activations:
            outputs = [name + "_quantized", name + "_scale", name + "_zero_point"]
            self._add(helper.make_node("DynamicQuantizeLinear", [name], outputs, name + "_QuantizeLinear"))
            self.activations[name] = (outputs[0], outputs[1], outputs[2])
        return self.activations[name]

    def _gather(self, node: Any) -> None:
        from onnx import TensorProto, helper

        data, output = node.input[0], node.output[0]
        quantized, scale, zero = self._quantize_weight(data, TensorProto.UINT8, None)
        gathered = helper.make_node("Gather", [quantized, *node.input[1:]], [output + "_quantized"], node.name)
        gathered.attribute.extend(node.attribute)
        self._add(gathered)
        self.quantized[output] = (output + "_quantized", scale, zero)

    def _dequantize(self, names: Iterable[str]) -> None:
        from onnx import helper

        for name in names:
            if name in self.quantized and name not in self.initializers and name not in self.dequantized:
                self.dequantized.add(name)
                self._add(helper.make_node(
                    "DequantizeLinear", list(self.quantized[name]), [name], name + "_DequantizeLinear"
                ))

    def _quantize_weight(self, name: str, qtype: int, axis: int | None) -> tuple[str, str, str]:
        """Int8 weights are symmetric, uint8 data asymmetric; the first request for a name wins."""
        from onnx import TensorProto

        if name in self.quantized:
            return self.quantized[name]
        source = self.initializers[name]
        names = (name + "_quantized", name + "_scale", name + "_zero_point")
        channels = None if axis is None else source.dims[axis]
        shape = [] if channels is None else [channels]
        # In this order: the values' producer computes the scale and zero point too.
        for tensor_name, data_type, dims in (
            (names[0], qtype, list(source.dims)), (names[1], source.data_type, shape), (names[2], qtype, shape)
        ):
            self.graph.initializer.append(TensorProto(name=tensor_name, data_type=data_type, dims=dims))
        symmetric = qtype == TensorProto.INT8

        def quantized() -> Any:
            values, scale, zero_point = quantize_array(self._read(name), qtype, symmetric, axis, self.reduce_range)
            self.params[name] = (scale, zero_point)
            return values

        def parameter(index: int) -> Producer:
            def produce() -> Any:
                if name not in self.params:
                    quantized()
                return self.params[name][index]
            return produce

        self.producers.update({names[0]: quantized, names[1]: parameter(0), names[2]: parameter(1)})
        self.quantized[name] = names
        return names


def quantize_array(
    array: Any, qtype: int, symmetric: bool, axis: int | None, reduce_range: bool = False
) -> tuple[Any, Any, Any]:
    """``(values, scale, zero_point)`` per tensor, or per slice along ``axis``, as ONNX Runtime computes them."""
    import numpy as np
    from onnx import helper
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range=reduce_range, symmetric=symmetric)
    if axis is None:
        minimums, maximums = np.array([array.min()]), np.array([array.max()])
    else:
        others = tuple(i for i in range(array.ndim) if i != axis % array.ndim)
        minimums, maximums = array.min(axis=others), array.max(axis=others)
    pairs = [
        compute_scale_zp(np.array(low, dtype=array.dtype), np.array(high, dtype=array.dtype),
                         qmin, qmax, symmetric)
        for low, high in zip(minimums, maximums)
    ]
    zero_points = np.array([pair[0] for pair in pairs], dtype=qmin.dtype)
    scales = np.array([pair[1] for pair in pairs], dtype=array.dtype)
    broadcast = [1] * array.ndim
    if axis is not None:
        broadcast[axis] = len(pairs)
    values = np.divide(array, scales.reshape(broadcast), dtype=np.float32)
    np.round(values, out=values)
    values += zero_points.reshape(broadcast)
    low, high = get_qmin_qmax_for_qType(qtype)
    np.clip(values, low, high, out=values)
    dtype = helper.tensor_dtype_to_np_dtype(qtype)
    if axis is None:
        return values.astype(dtype), scales.reshape(()), zero_points.reshape(())
    return values.astype(dtype), scales, zero_points


def _tensor_names(graph: Any) -> set[str]:
    names = {tensor.name for tensor in graph.initializer}
    names.update(value.name for value in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _used_names(node: Any) -> set[str]:
    """The node's inputs and every outer name its subgraphs read."""
    from onnx import AttributeProto

    used = set(node.input)
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                used |= _used_names(inner)
    return used


def _drop_unused_initializers(graph: Any) -> None:
    """Remove the initializers no node reads (the float weights that were quantized)."""
    used = {output.name for output in graph.output}
    for node in graph.node:
        used |= _used_names(node)
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    dropped = {tensor.name for tensor in graph.initializer} - {tensor.name for tensor in kept}
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [value for value in graph.input if value.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
