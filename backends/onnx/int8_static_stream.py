"""Static int8/uint8 of a large model, QDQ, one weight tensor at a time.

ONNX Runtime's ``quantize_static`` loads the whole model (with its weights), runs shape
inference on a copy, calibrates an augmented copy written to /tmp and keeps the
quantized model in memory until it is saved: 3.09x the weights' size at its peak on a
2.4 GB MLP. This path writes the same QDQ graph (int8_static_graph.py) from the skeleton:

* activation ranges come from transformer_ranges.py (one calibration batch folded in at a
  time, the statistics ONNX Runtime's minmax, percentile and entropy calibrators compute),
  in a forked child whose ONNX Runtime session reads the weights from a hard link of the
  model's data file in the scratch folder (a streamed copy where linking is impossible),
  only the tensors the quantizer reads as its outputs;
* scales and zero points are ONNX Runtime's ``compute_scale_zp`` with the settings
  ``quantize_static`` uses (activations asymmetric, full range; weights symmetric int8, per
  output channel or per tensor, ``reduce_range`` on weights only), Gemm/Conv biases int32
  with scale input x weight (a weight scale raised where the bias would overflow int32,
  ONNX Runtime's own adjustment), values rounded as its ``quantize_nparray`` does;
* each weight is read, quantized and written when the writer reaches it (external.py).

On bench_big's MLP (benchmarks/bench_static_stream.py) the result is byte for byte
``quantize_static``'s; the step's process peaked at 0.10x W (W = 2.42 GB), the calibration
child at 1.06x W (ONNX Runtime copies the weights into its own memory), where
``quantize_static`` took 3.09x W and a copy of the model in TMPDIR. Transformers take
int8_static_transformer.py (transformer_static.py's recipe, streamed the same way).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from compressor.plugin import (
    CompressionError,
    Context,
    Step,
    UnsupportedError,
    UsageError,
    first_line,
)
from compressor_onnx.external import load_skeleton, write_model
from compressor_onnx.int8_static_graph import QDQ_OPS, add_qdq, plan_qdq
from compressor_onnx.int8_static_parts import StreamedValues, calibrate, float_values, link_data

#: QuantizeLinear arrived in opset 10; DequantizeLinear's ``axis`` (per-channel) in 13.
QDQ_OPSET, PER_CHANNEL_OPSET = 10, 13


def quantize_static_large(source: Path, skeleton: Any, step: Step, excluded: list[str], context: Context
                          ) -> tuple[Path, list[str], dict[str, Any]]:
    """``quantize int8``/``uint8`` of the large model at ``source``: the result, notes, metadata
    (transformers: int8_static_transformer.py)."""
    from compressor_onnx.int8_file import static_model_type
    from compressor_onnx.quantize_common import resolve_reduce_range

    if context.calibration_data is None:
        raise UsageError(f"quantize {step.mode} needs --calibration-data")
    model_type = static_model_type(step, skeleton)
    reduce_range = resolve_reduce_range(step)
    target = Path(tempfile.mkdtemp(prefix="static-", dir=context.workdir)) / "static.onnx"
    if model_type == "transformer":
        from compressor_onnx.int8_static_transformer import quantize_transformer_stream

        notes, metadata = quantize_transformer_stream(source, target, step, excluded, context, reduce_range)
    else:
        notes, metadata = quantize_static_stream(source, target, step, excluded, context, reduce_range)
    return target, notes, {**metadata, "model_type": model_type, "reduce_range": reduce_range}


def quantize_static_stream(source: Path, target: Path, step: Step, excluded: list[str], context: Context,
                           reduce_range: bool) -> tuple[list[str], dict[str, Any]]:
    """Quantize the model at ``source`` into ``target`` (plus one ``.data``): notes and metadata."""
    from onnx import TensorProto

    from compressor_onnx.quantize_common import STATIC_OPS, op_types

    model = load_skeleton(source)
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)
    if opset < QDQ_OPSET:
        raise UnsupportedError(f"quantize {step.mode} of a large model needs opset {QDQ_OPSET} or later "
                               f"(QuantizeLinear); this graph is opset {opset}")
    per_channel, notes = bool(step.params.get("per_channel", True)), []
    if per_channel and opset < PER_CHANNEL_OPSET:
        per_channel = False
        notes.append(f"opset {opset}: per-channel weights need opset {PER_CHANNEL_OPSET} "
                     "(DequantizeLinear's axis); weights are per-tensor")
    activation_type = TensorProto.UINT8 if step.mode == "uint8" else TensorProto.INT8
    method = str(step.params.get("calibration_method", "minmax"))
    scratch = Path(tempfile.mkdtemp(prefix="static-calibration-", dir=context.workdir))
    try:
        plan = plan_qdq(model, float_values(source, scratch), set(op_types(STATIC_OPS, step)) & QDQ_OPS,
                        set(excluded), per_channel)
        originals = {tensor.name: _reference(tensor) for tensor in model.graph.initializer}
        calibrated = plan.calibrated(originals)
        context.progress(f"calibrating quantize {step.mode}", None)
        # Calibrated on the graph as it is (planning set Gemm betas to 1 and renamed shared biases).
        ranges, calibration_peak = (calibrate(load_skeleton(source), link_data(model, source, scratch), calibrated,
                                              step, context) if calibrated else ({}, 0))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    values = StreamedValues(plan, originals, source.parent, activation_type, reduce_range, ranges)
    try:
        emitted = add_qdq(model, plan, values.activations, values.initializer_types())
    except (ValueError, KeyError) as error:
        raise CompressionError(f"static {step.mode} quantization failed ({first_line(error)})") from None
    try:
        write_model(model, target, source.parent, values.producers(emitted), context.progress)
    except (ValueError, OSError) as error:
        raise CompressionError(f"writing the large model failed ({first_line(error)})") from None
    counts = Counter(plan.ops)
    quantized = ", ".join(f"{count} {op}" for op, count in sorted(counts.items())) or "no node"
    notes.append(f"static {step.mode} (large model, streamed): {quantized} quantized, QDQ, "
                 f"{'per-channel' if per_channel else 'per-tensor'} int8 weights, "
                 f"{'uint8' if activation_type == TensorProto.UINT8 else 'int8'} activations, {method} ranges")
    return notes, {"static_path": "streamed QDQ", "per_channel": per_channel, "calibration_method": method,
                   "quantized_nodes": dict(sorted(counts.items())), "calibration_peak_rss_bytes": calibration_peak}


def _reference(tensor: Any) -> Any:
    """A copy of an initializer's proto (the skeleton's is rewritten): where its data lives."""
    copy = type(tensor)()
    copy.CopyFrom(tensor)
    return copy
