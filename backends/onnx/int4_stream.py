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
in-memory path rewrites its MatMuls with the same ``matmuls_to_nbits`` (int4_rewrites.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.plugin import Context
from compressor_onnx.external import Producer, load_skeleton, read_array
from compressor_onnx.gptq import Quantized, quantize_gptq
from compressor_onnx.int4_rewrites import (
    drop_unused_initializers,
    matmuls_to_nbits,
    quantize_gathers,
    split_gemms,
)
from compressor_onnx.int4_settings import Int4Settings


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
