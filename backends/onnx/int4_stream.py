"""``quantize int4`` on a model past the large-model threshold, one weight at a time.

The skeleton's ``MatMul`` nodes whose weight is a 2-D float32 initializer become
the ``MatMulNBits`` nodes ONNX Runtime's ``MatMulNBitsQuantizer`` writes; each
weight is read from disk only when the writer reaches its quantized tensors, and
quantized by ONNX Runtime's own node quantizer (``DefaultWeightOnlyQuantizer``
or ``HQQWeightOnlyQuantizer``) on a graph holding that one weight, so the bytes
are the in-memory path's. Peak memory is about one float weight and its copies.

GPTQ (``gptq_stream``) first runs the model from its file once over the calibration
data for the layer inputs' Hessians (gptq.py), quantizing each weight as soon as its
inputs' pass is done; the writer then takes those (4-bit, small) tensors. The
in-memory path rewrites its MatMuls with the same ``matmuls_to_nbits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.plugin import Context
from compressor_onnx.external import Producer, load_skeleton, read_array
from compressor_onnx.gptq import Quantized, nbits_weight, quantize_gptq
from compressor_onnx.int4 import (
    BITS,
    Int4Settings,
    drop_unused_initializers,
    ensure_ms_opset,
    quantize_gathers,
    quiet_ort,
    split_gemms,
)


def gptq_stream(source: Path, settings: Int4Settings, context: Context, samples: int
                ) -> tuple[Any, dict[str, Producer], list[str]]:
    """GPTQ on the model at ``source`` (Gemms already split): its rewritten skeleton,
    producers of the new tensors' contents, and notes."""
    skeleton = load_skeleton(source)
    tensors = {tensor.name: tensor for tensor in skeleton.graph.initializer}
    quantized, notes = quantize_gptq(skeleton, source, lambda name: read_array(tensors[name], source.parent),
                                     settings, context, samples)
    return skeleton, quantize_int4_stream(skeleton, source.parent, settings, quantized), notes


def quantize_int4_stream(model: Any, folder: Path, settings: Int4Settings,
                         gptq: Quantized | None = None) -> dict[str, Producer]:
    """Rewrite ``model`` (a skeleton, in place); producers of every new tensor's contents
    (the MatMul weights' from ``gptq`` when given: ``quantize_gptq``'s result)."""
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
        producers.update(matmuls_to_nbits(model, initializers, read, settings, gptq))
    if "Gather" not in settings.excluded_ops:
        producers.update(quantize_gathers(model, read, settings))
    drop_unused_initializers(model)
    del model.graph.value_info[:]
    return {name: producer for name, producer in producers.items()
            if any(tensor.name == name for tensor in model.graph.initializer)}


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
