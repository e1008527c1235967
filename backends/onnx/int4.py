"""``quantize int4``: 4-bit weight-only quantization in blocks, activations stay float.

* ``MatMul`` weights (and ``Gemm``, split into ``MatMul`` + ``Add`` first, as the
  dynamic quantizer does) become ONNX Runtime's ``MatMulNBits``: in-memory models
  go through ONNX Runtime's own ``MatMulNBitsQuantizer`` (``rtn``: its default
  round-to-nearest C++ quantizer; ``hqq``); ``gptq`` and ``awq``, calibrated on
  ``--calibration-data``, are ours (gptq.py, gptq_solver.py; awq.py, awq_solver.py)
  and write the same tensors. Models past the large-model threshold are rewritten one weight at a
  time (``int4_stream.py``) with the same per-tensor quantizers, so both give the
  same bytes. The rewrites both paths share are in int4_rewrites.py.
* Embeddings (``Gather`` on a float matrix) become ``GatherBlockQuantized``
  with the same block size, 4-bit values packed two to a byte in a ``uint8``
  tensor (so the opset stays as it is; ONNX Runtime's own Gather path raises it
  to 21 without converting the graph). Rounding uses ONNX Runtime's block
  functions. ``exclude_op_types=Gather`` keeps them float.

Other weighted ops (Conv, LSTM...) stay float; ``float_nodes`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compressor.plugin import CompressionError, Context, Step, UsageError, first_line
from compressor_onnx.int4_rewrites import (
    drop_unused_initializers,
    matmuls_to_nbits,
    quantize_gathers,
    split_gemms,
)
from compressor_onnx.int4_settings import (
    BITS,
    BLOCK_SIZES,
    CALIBRATED_ALGORITHMS,
    DEFAULT_BLOCK_SIZE,
    Int4Settings,
)
from compressor_onnx.quantize_common import quiet_ort


def check_int4(step: Step, context: Context) -> None:
    """What core's declaration cannot say, refused before any work."""
    if step.mode != "int4":
        return
    algorithm = str(step.params.get("algorithm", "rtn"))
    if algorithm in CALIBRATED_ALGORITHMS and context.calibration_data is None:
        raise UsageError(f"quantize int4 algorithm={algorithm} needs --calibration-data")
    if str(step.params.get("block_size", DEFAULT_BLOCK_SIZE)) not in BLOCK_SIZES:
        raise UsageError(f"block_size must be a power of two from 16 to 256, not {step.params['block_size']}")


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
        if settings.algorithm in CALIBRATED_ALGORITHMS:
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
    """GPTQ (gptq.py) or AWQ (awq.py) on ``model``'s MatMul weights, rewritten in place as
    MatMulNBits (AWQ's input scales folded or inserted too); notes."""
    from onnx import numpy_helper

    from compressor_onnx.gptq import quantize_gptq

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
