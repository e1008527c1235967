"""Int8 through ONNX Runtime, into an ONNX file: ``quantize dynamic`` (from an in-memory
graph, or a file), and static int8/uint8 from a file, dispatched by the graph (transformers:
transformer_static.py; others: a configuration chosen by measured fidelity, int8_choice.py;
past the large-model threshold: the weighted ops, QDQ). The in-memory (quantization.py) and
large (large.py) paths both come here. ONNX Runtime's temporary copies go into the result's
own scratch folder (the forked child's ``tempfile.tempdir``), never straight into ``$TMPDIR``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Context, Dataset, Step, UsageError
from compressor_onnx.quantize_common import (
    STATIC_OPS,
    calibration_method,
    is_large_file,
    op_types,
    quiet_ort,
    resolve_reduce_range,
)
from compressor_onnx.quantize_failures import keep_for_debugging, kept_suffix, shown_reason


def quantize_int8_file(
    source: Path, target: Path, step: Step, excluded: list[str], context: Context, skeleton: Any
) -> tuple[list[str], dict[str, Any]]:
    """Dynamic or static (transformer or generic) int8 from ``source`` to ``target``.

    ONNX Runtime's quantizer runs in a forked child: a native crash or running out of
    memory there (it segfaults under ``ulimit -v``) is one line, not the end of the run."""
    from compressor.plugin import run_in_fork

    return run_in_fork(_quantize_int8_file, source, target, step, excluded, context, skeleton,
                       step=f"quantize {step.mode}")


def quantize_dynamic_graph(graph: Any, target: Path, step: Step, excluded: list[str]) -> dict[str, Any]:
    """Dynamic int8 of an in-memory ``graph`` into ``target`` (next to which nothing else is
    written); its metadata. ONNX Runtime saves the graph to reload it with inferred shapes (twice),
    each time a temporary copy that it removes once loaded: handed the graph rather than a
    file, it never holds two copies of the weights on disk at once (a file of ours would be the
    second). Its temporary folders go beside ``target`` (private, removed with it), never
    straight into ``$TMPDIR`` where a crash would leave them."""
    from compressor.plugin import run_in_fork

    reduce_range = resolve_reduce_range(step)
    run_in_fork(_quantize_dynamic_here, graph, target, step, excluded, reduce_range, step=f"quantize {step.mode}")
    return {"reduce_range": reduce_range}


def _quantize_dynamic_here(graph: Any, target: Path, step: Step, excluded: list[str], reduce_range: bool) -> None:
    import tempfile

    from compressor_frontends.pytorch.export import large_model_bytes

    tempfile.tempdir = str(target.parent)  # this forked child's own setting
    _quantize_dynamic(graph, target, step, excluded, reduce_range, external=graph.ByteSize() > large_model_bytes())


def _quantize_int8_file(
    source: Path, target: Path, step: Step, excluded: list[str], context: Context, skeleton: Any
) -> tuple[list[str], dict[str, Any]]:
    import tempfile

    tempfile.tempdir = str(target.parent)  # ONNX Runtime's temporary copies: in our scratch folder
    reduce_range = resolve_reduce_range(step)
    if step.mode == "dynamic":
        _quantize_dynamic(source, target, step, excluded, reduce_range, external=is_large_file(source))
        return [], {"reduce_range": reduce_range}
    model_type = static_model_type(step, skeleton)
    if model_type == "transformer":
        from compressor_onnx.transformer_static import quantize_transformer_file

        notes, metadata = quantize_transformer_file(source, target, step, excluded, context, reduce_range)
        return notes, {**metadata, "model_type": model_type, "reduce_range": reduce_range}
    if is_large_file(source):
        notes = quantize_static_file(source, target, step, excluded, context, reduce_range)
        return notes, {"model_type": model_type, "reduce_range": reduce_range}
    from compressor_onnx.int8_choice import quantize_generic_static

    notes, metadata = quantize_generic_static(source, target, step, excluded, context, reduce_range)
    return notes, {**metadata, "model_type": model_type, "reduce_range": reduce_range}


def static_model_type(step: Step, graph: Any) -> str:
    """``transformer`` or ``generic``: the parameter, or what the graph looks like."""
    from compressor_onnx.transformer_static import is_transformer

    chosen = str(step.params.get("model_type", "auto"))
    if chosen != "auto":
        return chosen
    return "transformer" if is_transformer(graph) else "generic"


def _quantize_dynamic(source: Path | Any, target: Path, step: Step, excluded_nodes: list[str], reduce_range: bool,
                      external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    try:
        with quiet_ort():
            quantize_dynamic(
                source,
                target,
                weight_type=QuantType.QInt8,
                per_channel=bool(step.params.get("per_channel", True)),
                reduce_range=reduce_range,
                nodes_to_exclude=excluded_nodes,
                op_types_to_quantize=op_types(IntegerOpsRegistry, step),
                use_external_data_format=external,
            )
    except Exception as error:  # noqa: BLE001 - the quantizer raises anything on odd graphs
        raise CompressionError(f"dynamic quantization failed ({shown_reason(error)})") from None


def quantize_static_file(
    source: Path, target: Path, step: Step, excluded_nodes: list[str], context: Context, reduce_range: bool = False
) -> list[str]:
    """ONNX Runtime's ``quantize_static`` over the weighted ops, QDQ (models past the
    large-model threshold, where trying several configurations would cost several copies); notes."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from compressor_onnx.int8_choice import PER_CHANNEL_OPSET, _opset

    if context.calibration_data is None:
        raise UsageError(f"quantize {step.mode} needs --calibration-data")
    activation = QuantType.QUInt8 if step.mode == "uint8" else QuantType.QInt8
    skeleton = onnx.load(str(source), load_external_data=False)
    reader = calibration_reader(skeleton, context.calibration_data, int(step.params.get("calibration_samples", 128)),
                                context.options)
    per_channel, notes = bool(step.params.get("per_channel", True)), []
    if per_channel and _opset(skeleton) < PER_CHANNEL_OPSET:
        per_channel = False
        notes.append(f"opset {_opset(skeleton)}: per-channel weights need opset {PER_CHANNEL_OPSET} "
                     "(DequantizeLinear's axis); weights are per-tensor")
    try:
        with quiet_ort():
            quantize_static(
                source,
                target,
                reader,
                quant_format=QuantFormat.QDQ,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                reduce_range=reduce_range,
                calibrate_method=calibration_method(str(step.params.get("calibration_method", "minmax"))),
                nodes_to_exclude=excluded_nodes,
                op_types_to_quantize=op_types(STATIC_OPS, step),
                use_external_data_format=is_large_file(source),
            )
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - the quantizer raises anything on odd graphs
        kept = keep_for_debugging([target], "failed-int8")
        raise CompressionError(
            f"static {step.mode} quantization failed ({shown_reason(error)}){kept_suffix(kept)}") from None
    return notes


def calibration_reader(graph: Any, dataset: Dataset, samples: int, options: Mapping[str, Any] | None = None) -> Any:
    """A CalibrationDataReader over the first ``samples`` examples, cast to the graph's dtypes
    and fed as measuring feeds them (scalars whole, ``batch_axis.NAME``); a state input gets
    the data's initial state (static_calibration.py carries it where the outputs are read)."""
    from onnxruntime.quantization import CalibrationDataReader

    from compressor_onnx.static_calibration import calibration_feeds

    batches = calibration_feeds(graph, dataset, samples, options).batches()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.remaining, None)

    return Reader()
