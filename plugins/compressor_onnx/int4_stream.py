"""``quantize int4`` (rtn, hqq) on a model past the large-model threshold, one weight at a time.

The skeleton's ``MatMul`` nodes whose weight is a 2-D float32 initializer become
the ``MatMulNBits`` nodes ONNX Runtime's ``MatMulNBitsQuantizer`` writes; each
weight is read from disk only when the writer reaches its quantized tensors, and
quantized by ONNX Runtime's own node quantizer (``DefaultWeightOnlyQuantizer``
or ``HQQWeightOnlyQuantizer``) on a graph holding that one weight, so the bytes
are the in-memory path's. Peak memory is about one float weight and its copies.
GPTQ needs the whole model's activations and is not streamed (see large.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor_onnx.external import Producer, read_array
from compressor_onnx.int4 import (
    BITS,
    Int4Settings,
    drop_unused_initializers,
    ensure_ms_opset,
    quantize_gathers,
    quiet_ort,
    split_gemms,
)


def quantize_int4_stream(model: Any, folder: Path, settings: Int4Settings) -> dict[str, Producer]:
    """Rewrite ``model`` (a skeleton, in place); producers of every new tensor's contents."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    # Copies: the writer points the skeleton's own tensors at the new data file as it goes.
    references = {name: type(tensor)() for name, tensor in initializers.items()}
    for name, reference in references.items():
        reference.CopyFrom(initializers[name])
    sources: dict[str, Producer] = {}

    def read(name: str) -> Any:
        if name in sources:
            return sources[name]()
        return read_array(references[name], folder)

    producers: dict[str, Producer] = {}
    added = split_gemms(model, read, settings)
    sources.update(added)
    producers.update(added)
    initializers.update({tensor.name: tensor for tensor in model.graph.initializer})
    if "MatMul" not in settings.excluded_ops:
        producers.update(_matmuls(model, initializers, read, settings))
    if "Gather" not in settings.excluded_ops:
        producers.update(quantize_gathers(model, read, settings))
    drop_unused_initializers(model)
    del model.graph.value_info[:]
    return {name: producer for name, producer in producers.items()
            if any(tensor.name == name for tensor in model.graph.initializer)}


def _matmuls(model: Any, initializers: dict[str, Any], read: Any, settings: Int4Settings) -> dict[str, Producer]:
    from onnx import TensorProto, helper

    producers: dict[str, Producer] = {}
    done: dict[str, tuple[str, ...]] = {}
    nodes = []
    for node in model.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (weight is None or node.domain not in ("", "ai.onnx") or node.name in settings.excluded_nodes
                or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2):
            nodes.append(node)
            continue
        if weight.name not in done:
            done[weight.name] = _weight_tensors(model, weight.name, node, read, settings, producers)
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
                    producers: dict[str, Producer]) -> tuple[str, ...]:
    """Stand-ins for one weight's quantized tensors, named as ONNX Runtime names them."""
    zero_points = settings.algorithm == "hqq" or not settings.symmetric
    names = (f"{name}_Q{BITS}", f"{name}_scales") + ((f"{name}_zero_points",) if zero_points else ())
    cache: dict[str, Any] = {}

    def produce(index: int) -> Producer:
        def run() -> Any:
            if not cache:
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
