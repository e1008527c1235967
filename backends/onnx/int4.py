"""``quantize int4``: 4-bit weight-only quantization in blocks, activations stay float.

* ``MatMul`` weights (and ``Gemm``, split into ``MatMul`` + ``Add`` first, as the
  dynamic quantizer does) become ONNX Runtime's ``MatMulNBits``: in-memory models
  go through ONNX Runtime's own ``MatMulNBitsQuantizer`` (``rtn``: its default
  round-to-nearest C++ quantizer; ``hqq``); ``gptq``, calibrated on
  ``--calibration-data``, is ours (gptq.py, gptq_solver.py) and writes the same
  tensors. Models past the large-model threshold are rewritten one weight at a
  time (``int4_stream.py``) with the same per-tensor quantizers, so both give the
  same bytes.
* Embeddings (``Gather`` on a float matrix) become ``GatherBlockQuantized``
  with the same block size, 4-bit values packed two to a byte in a ``uint8``
  tensor (so the opset stays as it is; ONNX Runtime's own Gather path raises it
  to 21 without converting the graph). Rounding uses ONNX Runtime's block
  functions. ``exclude_op_types=Gather`` keeps them float.

Other weighted ops (Conv, LSTM...) stay float; ``float_nodes`` lists them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from compressor.plugin import CompressionError, Context, Step, UsageError, first_line

ALGORITHMS = ("rtn", "hqq", "gptq")
#: MatMulNBits and GatherBlockQuantized take power-of-two blocks from 16.
BLOCK_SIZES = ("16", "32", "64", "128", "256")
#: Measured on all-MiniLM-L6-v2 (docs/backends/onnx.md): 32 keeps the most
#: fidelity and still makes linear weights 6.2x smaller (asymmetric).
DEFAULT_BLOCK_SIZE = "32"
#: Int8 compute inside MatMulNBits: measured faster than float compute with the
#: same outputs to 4 decimals on all-MiniLM-L6-v2.
DEFAULT_ACCURACY_LEVEL = 4
BITS = 4

Reader = Callable[[str], Any]


@dataclass(frozen=True)
class Int4Settings:
    block_size: int
    symmetric: bool
    algorithm: str
    accuracy_level: int
    excluded_nodes: frozenset[str]
    excluded_ops: frozenset[str]

    @classmethod
    def from_step(cls, step: Step) -> Int4Settings:
        from compressor_onnx.quantization import parse_names

        return cls(
            block_size=int(step.params.get("block_size", DEFAULT_BLOCK_SIZE)),
            symmetric=bool(step.params.get("symmetric", False)),
            algorithm=str(step.params.get("algorithm", "rtn")),
            accuracy_level=int(step.params.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)),
            excluded_nodes=frozenset(parse_names(step.params.get("exclude_nodes"))),
            excluded_ops=frozenset(parse_names(step.params.get("exclude_op_types"))),
        )


def check_int4(step: Step, context: Context) -> None:
    """What core's declaration cannot say, refused before any work."""
    if step.mode != "int4":
        return
    if str(step.params.get("algorithm", "rtn")) == "gptq" and context.calibration_data is None:
        raise UsageError("quantize int4 algorithm=gptq needs --calibration-data")
    if str(step.params.get("block_size", DEFAULT_BLOCK_SIZE)) not in BLOCK_SIZES:
        raise UsageError(f"block_size must be a power of two from 16 to 256, not {step.params['block_size']}")


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """The weight-only quantizers configure the root logger at import and print
    progress bars: keep both off the CLI's output."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        root.setLevel(level)
        root.handlers[:] = handlers


def quantize_int4_graph(graph: Any, step: Step, context: Context) -> tuple[Any, list[str]]:
    """``quantize int4`` on an in-memory model (a copy; ``graph`` stays as it is); the model and notes."""
    import onnx
    from onnx import numpy_helper

    settings = Int4Settings.from_step(step)
    model = onnx.ModelProto()
    model.CopyFrom(graph)

    def read(name: str) -> Any:
        return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))

    notes: list[str] = []
    _materialize(model, split_gemms(model, read, settings))
    if "MatMul" not in settings.excluded_ops:
        if settings.algorithm == "gptq":
            notes = gptq_matmuls(model, settings, context, int(step.params.get("calibration_samples", 128)))
        else:
            model = matmul_nbits(model, settings)
    if "Gather" not in settings.excluded_ops:
        _materialize(model, quantize_gathers(model, read, settings))
    drop_unused_initializers(model)
    return model, notes


def _materialize(model: Any, producers: dict[str, Callable[[], Any]]) -> None:
    """Fill the stand-in initializers the rewrites added with what their producers make."""
    from onnx import numpy_helper

    tensors = {tensor.name: tensor for tensor in model.graph.initializer if tensor.name in producers}
    for name, produce in producers.items():
        tensors[name].CopyFrom(numpy_helper.from_array(produce(), name))


def gptq_matmuls(model: Any, settings: Int4Settings, context: Context, samples: int) -> list[str]:
    """GPTQ (gptq.py) on ``model``'s MatMul weights, rewritten in place as MatMulNBits; notes."""
    from onnx import numpy_helper

    from compressor_onnx.gptq import quantize_gptq
    from compressor_onnx.int4_stream import matmuls_to_nbits

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}

    def read(name: str) -> Any:
        return numpy_helper.to_array(initializers[name])

    quantized, notes = quantize_gptq(model, model, read, settings, context, samples)
    _materialize(model, matmuls_to_nbits(model, initializers, read, settings, quantized))
    return notes


def matmul_nbits(model: Any, settings: Int4Settings) -> Any:
    """ONNX Runtime's MatMulNBitsQuantizer (``rtn`` or ``hqq``) on ``model``: the quantized ModelProto."""
    with quiet_ort():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        try:
            quantizer = MatMulNBitsQuantizer(
                model, bits=BITS, block_size=settings.block_size, is_symmetric=settings.symmetric,
                accuracy_level=settings.accuracy_level or None,
                nodes_to_exclude=sorted(settings.excluded_nodes), op_types_to_quantize=("MatMul",),
                algo_config=algorithm_config(settings),
            )
            quantizer.process()
        except Exception as error:  # noqa: BLE001 - the quantizer raises anything on odd graphs
            raise CompressionError(f"int4 {settings.algorithm} quantization failed ({first_line(error)})") from None
    quantized = quantizer.model.model
    set_accuracy_level(quantized, settings.accuracy_level)
    return quantized


def algorithm_config(settings: Int4Settings) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    if settings.algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=BITS, op_types_to_quantize=("MatMul",))
    return DefaultWeightOnlyQuantConfig(
        block_size=settings.block_size, is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level or None, op_types_to_quantize=("MatMul",), bits=BITS,
    )


def set_accuracy_level(model: Any, level: int) -> None:
    """HQQ writes MatMulNBits without ``accuracy_level``: give every node the one asked for."""
    from onnx import helper

    if not level:
        return
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level", level))


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
