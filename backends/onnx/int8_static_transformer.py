"""Static int8 of a large transformer, one weight tensor at a time.

transformer_static.py's recipe (its ``plan_targets`` of the MatMul/Gemm to quantize and the ops kept
float, SmoothQuant, activations uint8 on x86, MatMul/Gemm outputs left float, embeddings
weight-only uint8) without ONNX Runtime's ``quant_pre_process`` and ``quantize_static``, which
both load the whole model:

* ``quant_pre_process`` is skipped (a note says so): its symbolic shape inference and optimizer
  session hold the model, several times over;
* SmoothQuant's scaled weights are producers, quantized when the writer reaches them, never
  written in float;
* the quantized MatMuls' inputs (``x * 1/s`` after SmoothQuant) are calibrated on the graph as
  it is, each probed value multiplied by its ``1/s`` before it is folded in (the ``Mul`` the
  smoothed graph computes), in a forked child (int8_static_parts.calibrate);
* the QDQ graph is int8_static_graph.py's with ``nodes_to_quantize`` and
  ``OpTypesToExcludeOutputQuantization`` as transformer_static.py sets them, and the
  embeddings are int8_stream.py's Gather rewrite, all written in one pass.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Context, Step, first_line
from compressor_onnx.external import load_skeleton, write_model

_SMOOTHED = "_smoothed"


def quantize_transformer_stream(source: Path, target: Path, step: Step, excluded: list[str], context: Context,
                                reduce_range: bool) -> tuple[list[str], dict[str, Any]]:
    """Quantize the transformer at ``source`` into ``target`` (plus one ``.data``): notes and metadata."""
    from compressor_onnx.int8_static_graph import add_qdq, plan_qdq
    from compressor_onnx.int8_static_parts import (
        StreamedValues,
        calibrate,
        float_values,
        link_data,
    )
    from compressor_onnx.int8_stream import quantize_dynamic_int8
    from compressor_onnx.quantize_common import op_types
    from compressor_onnx.transformer_static import DEFAULT_ALPHA, activation_type, plan_targets

    model, original = load_skeleton(source), load_skeleton(source)
    allowed = set(op_types(("MatMul", "Gemm", "Gather"), step))
    targets, reasons = plan_targets(model, set(excluded), allowed)
    alpha = float(step.params.get("alpha", DEFAULT_ALPHA))
    activations = activation_type(step.mode)
    scratch = Path(tempfile.mkdtemp(prefix="static-transformer-", dir=context.workdir))
    try:
        linked = link_data(model, source, scratch)
        floats = float_values(source, scratch)
        sources, smoothed = (_smooth(model, original, linked, targets, alpha, context, step)
                             if alpha > 0 and targets else ({}, {}))
        floats |= {name + _SMOOTHED for name in smoothed}
        per_channel = bool(step.params.get("per_channel", True))
        plan = plan_qdq(model, floats, {"MatMul", "Gemm"}, set(excluded), per_channel,
                        only={node.name for node in targets}, outputs_of=frozenset())
        originals = {tensor.name: tensor for tensor in model.graph.initializer}
        probed = {name: name.removesuffix(_SMOOTHED) if name.removesuffix(_SMOOTHED) in smoothed else name
                  for name in plan.calibrated(originals)}
        ranges: dict[str, Any] = {}
        calibration_peak = 0
        if probed:
            scales = {name: smoothed[name] for name in probed.values() if name in smoothed}
            found, calibration_peak = calibrate(original, linked, list(dict.fromkeys(probed.values())), step,
                                                context, scales)
            ranges = {name: found[probe] for name, probe in probed.items()}
        values = StreamedValues(plan, {name: _copy(tensor) for name, tensor in originals.items()}, linked.parent,
                                _activation_onnx_type(activations), reduce_range, ranges, sources)
        emitted = add_qdq(model, plan, values.activations, values.initializer_types())
        embeddings = (quantize_dynamic_int8(model, linked.parent, False, excluded, ["Gather"], convert_gemm=False,
                                            reduce_range=reduce_range) if "Gather" in allowed else {})
        write_model(model, target, linked.parent, {**values.producers(emitted), **embeddings}, context.progress)
    except (ValueError, KeyError, OSError) as error:
        raise CompressionError(f"static {step.mode} quantization failed ({first_line(error)})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    notes, metadata = _report(model, targets, reasons, embeddings, alpha, activations, step)
    return notes, {**metadata, "calibration_peak_rss_bytes": calibration_peak}


def _smooth(model: Any, original: Any, linked: Path, targets: list[Any], alpha: float, context: Context,
            step: Step) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformer_static's SmoothQuant on ``model`` (in place): producers of the scaled weights,
    and ``{activation: 1/s}`` for each activation now read through a ``Mul`` by ``1/s``."""
    from onnx import numpy_helper

    from compressor_onnx.transformer_static import smooth

    groups = list(dict.fromkeys(node.input[0] for node in targets))  # smooth() renames the targets' inputs
    sources = smooth(model, linked, targets, alpha, context, int(step.params.get("calibration_samples", 128)))
    _typed(model, original, sources)
    inverses = {tensor.name: tensor for tensor in model.graph.initializer}
    smoothed = {name: numpy_helper.to_array(inverses[name + "_smooth_scale"]) for name in groups
                if name + "_smooth_scale" in inverses}
    return sources, smoothed


def _typed(model: Any, original: Any, sources: dict[str, Any]) -> None:
    """SmoothQuant's new weights get their originals' type and shape (planning reads them)."""
    weights = {tensor.name: tensor for tensor in original.graph.initializer}
    for tensor in model.graph.initializer:
        if tensor.name in sources and tensor.name.removesuffix(_SMOOTHED) in weights:
            base = weights[tensor.name.removesuffix(_SMOOTHED)]
            tensor.data_type = base.data_type
            del tensor.dims[:]
            tensor.dims.extend(base.dims)


def _copy(tensor: Any) -> Any:
    copy = type(tensor)()
    copy.CopyFrom(tensor)
    return copy


def _activation_onnx_type(activations: str) -> int:
    from onnx import TensorProto

    return TensorProto.UINT8 if activations == "uint8" else TensorProto.INT8


def _report(model: Any, targets: list[Any], reasons: dict[str, list[str]], embeddings: dict[str, Any],
            alpha: float, activations: str, step: Step) -> tuple[list[str], dict[str, Any]]:
    """transformer_static.py's notes and metadata, and the step this path leaves out."""
    from compressor_onnx.transformer_static import static_metadata

    metadata = static_metadata(model, targets, reasons, embeddings, alpha, activations, "transformer, streamed")
    notes = [
        "large model: ONNX Runtime's quant_pre_process is skipped (it loads the whole model)",
        f"transformer static {step.mode}: {len(targets)} MatMul/Gemm with constant weights quantized "
        f"per-channel, {activations} activations, SmoothQuant alpha={alpha:g}, embeddings weight-only uint8; "
        + "; ".join(f"{len(names)} {reason}" for reason, names in reasons.items()
                    if names and reason != "stay float by design")
        + " kept float (float_node_reasons)",
    ]
    return notes, metadata
