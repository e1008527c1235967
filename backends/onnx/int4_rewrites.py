"""The graph rewrites of ``quantize int4`` that the in-memory (int4.py) and streaming
(int4_stream.py) paths share: Gemms split into MatMuls, MatMuls as ``MatMulNBits`` and
embeddings as ``GatherBlockQuantized``. Each rewrites the graph in place and returns
producers of its new tensors' contents, computed when the writer asks for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compressor_onnx.external import Producer
from compressor_onnx.gptq import Quantized, nbits_weight
from compressor_onnx.int4_settings import BITS, Int4Settings
from compressor_onnx.quantize_common import quiet_ort

Reader = Callable[[str], Any]


def split_gemms(model: Any, read: Reader, settings: Int4Settings) -> dict[str, Callable[[], Any]]:
    """``Gemm`` (alpha = beta = 1, no transA, weight an initializer) as ``MatMul`` (+ ``Add``),
    in place; returns producers of the transposed weights it added (empty stand-ins for now)."""
    from onnx import TensorProto, helper

    if "MatMul" in settings.excluded_ops or "Gemm" in settings.excluded_ops:
        return {}
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers: dict[str, Callable[[], Any]] = {}
    nodes: list[Any] = []
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else ""
        source = initializers.get(weight)
        if (node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or node.name in settings.excluded_nodes
                or source is None or source.data_type != TensorProto.FLOAT or len(source.dims) != 2
                or (attributes.get("alpha", 1.0), attributes.get("beta", 1.0), attributes.get("transA", 0)) != (1.0, 1.0, 0)):
            nodes.append(node)
            continue
        if attributes.get("transB", 0):
            transposed = weight + "_transposed"
            if transposed not in initializers:
                tensor = graph.initializer.add()
                tensor.name, tensor.data_type = transposed, source.data_type
                tensor.dims.extend(reversed(source.dims))
                initializers[transposed] = tensor
                producers[transposed] = (lambda name: lambda: read(name).T.copy())(weight)
            weight = transposed
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + ("_MatMul" if has_bias else "")
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product],
                                      (node.name or node.output[0]) + "_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                          (node.name or node.output[0]) + "_Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    return producers


def matmuls_to_nbits(model: Any, initializers: dict[str, Any], read: Any, settings: Int4Settings,
                     gptq: Quantized | None = None) -> dict[str, Producer]:
    """MatMuls with a 2-D float32 weight as MatMulNBits (in place); producers of the new tensors."""
    from onnx import helper

    producers: dict[str, Producer] = {}
    done: dict[str, tuple[str, ...]] = {}
    nodes = []
    for node in model.graph.node:
        weight = nbits_weight(node, initializers, settings)
        if weight is None:
            nodes.append(node)
            continue
        if weight.name not in done:
            done[weight.name] = _weight_tensors(model, weight.name, node, read, settings, producers, gptq)
        rows, cols = weight.dims
        attributes: dict[str, Any] = {"K": rows, "N": cols, "bits": BITS, "block_size": settings.block_size}
        if settings.accuracy_level:
            attributes["accuracy_level"] = settings.accuracy_level
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *done[weight.name]], list(node.output),
            node.name + f"_Q{BITS}" if node.name else "", domain="com.microsoft", **attributes,
        ))
    if done:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        ensure_ms_opset(model)
    return producers


def _weight_tensors(model: Any, name: str, node: Any, read: Any, settings: Int4Settings,
                    producers: dict[str, Producer], gptq: Quantized | None) -> tuple[str, ...]:
    """Stand-ins for one weight's quantized tensors, named as ONNX Runtime names them."""
    zero_points = settings.algorithm == "hqq" or not settings.symmetric
    names = (f"{name}_Q{BITS}", f"{name}_scales") + ((f"{name}_zero_points",) if zero_points else ())
    cache: dict[str, Any] = {}

    def produce(index: int) -> Producer:
        def run() -> Any:
            if not cache:
                if gptq is not None:
                    made = gptq.pop(name)
                    cache.update(zip(names, (made["B"], made["scales"], made.get("zero_points"))))
                else:
                    cache.update(quantize_weight(read(name), name, node, settings))
            return cache.pop(names[index])
        return run

    for index, tensor_name in enumerate(names):
        model.graph.initializer.add().name = tensor_name
        producers[tensor_name] = produce(index)
    return names


def quantize_weight(array: Any, name: str, node: Any, settings: Int4Settings) -> dict[str, Any]:
    """ONNX Runtime's node quantizer on a graph holding only this weight: its new tensors by name."""
    from onnx import GraphProto, helper, numpy_helper

    with quiet_ort():
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
            HQQWeightOnlyQuantConfig,
            HQQWeightOnlyQuantizer,
        )

        graph = GraphProto(initializer=[numpy_helper.from_array(array, name)])
        probe = helper.make_node("MatMul", [node.input[0], name], list(node.output), node.name)
        if settings.algorithm == "hqq":
            config = HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=BITS)
            HQQWeightOnlyQuantizer(config).quantize(probe, [graph])
        else:
            config = DefaultWeightOnlyQuantConfig(
                block_size=settings.block_size, is_symmetric=settings.symmetric,
                accuracy_level=settings.accuracy_level or None, bits=BITS,
            )
            DefaultWeightOnlyQuantizer(config).quantize(probe, [graph])
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer if tensor.name != name}


def quantize_gathers(model: Any, read: Reader, settings: Int4Settings) -> dict[str, Callable[[], Any]]:
    """Embedding ``Gather`` nodes as ``GatherBlockQuantized`` (in place); producers of
    the new tensors, computed once per embedding matrix when first asked for."""
    from onnx import TensorProto, helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers: dict[str, Callable[[], Any]] = {}
    done: dict[str, tuple[str, ...]] = {}
    nodes = []
    for node in graph.node:
        data = initializers.get(node.input[0]) if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if (data is None or node.name in settings.excluded_nodes or data.data_type != TensorProto.FLOAT
                or len(data.dims) != 2 or axis != 0 or data.dims[1] % 2):
            nodes.append(node)
            continue
        if data.name not in done:
            done[data.name] = _gather_tensors(graph, data.name, settings, read, producers)
        nodes.append(helper.make_node(
            "GatherBlockQuantized", [done[data.name][0], node.input[1], *done[data.name][1:]], list(node.output),
            (node.name or node.output[0]) + "_Q4", domain="com.microsoft",
            gather_axis=0, quantize_axis=1, block_size=settings.block_size, bits=BITS,
        ))
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
        ensure_ms_opset(model)
    return producers


def _gather_tensors(graph: Any, name: str, settings: Int4Settings, read: Reader,
                    producers: dict[str, Callable[[], Any]]) -> tuple[str, ...]:
    names = (name + "_Q4", name + "_scales") + (() if settings.symmetric else (name + "_zero_points",))
    cache: dict[str, Any] = {}

    def produce(index: int) -> Callable[[], Any]:
        def run() -> Any:
            if not cache:
                cache.update(zip(names, block_quantize_rows(read(name), settings.block_size, settings.symmetric)))
            return cache.pop(names[index])
        return run

    for index, tensor_name in enumerate(names):
        tensor = graph.initializer.add()
        tensor.name = tensor_name
        producers[tensor_name] = produce(index)
    return names


def block_quantize_rows(data: Any, block: int, symmetric: bool) -> tuple[Any, ...]:
    """Rows of ``data`` ``[V, H]`` in blocks of ``block`` along H, with ONNX Runtime's
    block functions: packed uint8 ``[V, H/2]``, scales ``[V, blocks]`` and (asymmetric)
    packed zero points ``[V, ceil(blocks/2)]``; symmetric values are stored + 8, the
    default zero point of GatherBlockQuantized's uint8 data."""
    import numpy as np
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantizer as Quantizer,
    )

    rows, width = data.shape
    blocks = -(-width // block)
    values = np.empty((rows, width), dtype=np.uint8)
    scales = np.empty((rows, blocks), dtype=data.dtype)
    zeros = np.zeros((rows, blocks + blocks % 2), dtype=np.uint8)
    # An all-zero block (an embedding's padding row) has scale 0: ONNX Runtime's functions
    # divide by it, then choose the zero point with np.where, and numpy warns on the terminal.
    with np.errstate(divide="ignore", invalid="ignore"):
        for index in range(blocks):
            part = slice(index * block, min((index + 1) * block, width))
            if symmetric:
                quantized, scale = Quantizer.quant_slice_symmetric(data[:, part])
                values[:, part] = (quantized + 8).astype(np.uint8)
            else:
                quantized, scale, zero = Quantizer.quant_slice_asymmetric(data[:, part])
                values[:, part] = quantized
                zeros[:, index] = zero[:, 0]
            scales[:, index] = scale[:, 0]
    packed = values[:, 0::2] | (values[:, 1::2] << 4)
    if symmetric:
        return packed, scales
    return packed, scales, zeros[:, 0::2] | (zeros[:, 1::2] << 4)


def ensure_ms_opset(model: Any) -> None:
    from onnx import helper

    if not any(entry.domain == "com.microsoft" for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def drop_unused_initializers(model: Any) -> None:
    from compressor_onnx.int8_stream import _drop_unused_initializers

    _drop_unused_initializers(model.graph)
