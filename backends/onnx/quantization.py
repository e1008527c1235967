"""ONNX Runtime quantization: dynamic int8, static QDQ int8/uint8 (transformer
graphs: transformer_static.py; other graphs: a configuration chosen by measured
fidelity, int8_choice.py), weight-only int4 (int4.py) and fp16.

Defaults were chosen by measured accuracy (benchmarks/bench_onnx_minilm.py):
per-channel weights keep all-MiniLM-L6-v2's sentence embeddings at ~0.994
cosine to float32, where ONNX Runtime's own per-tensor default gives ~0.96.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Context, Dataset, Step, UsageError
from compressor_frontends.pytorch.export import large_model_bytes, strip_value_info
from compressor_frontends.pytorch.onnx_graph import WEIGHTED_OPS
from compressor_onnx.quantize_failures import keep_for_debugging, kept_suffix, shown_reason

#: The weighted ops: what static quantization covers on models past the large-model
#: threshold, and one of the configurations the generic path tries (int8_choice.py).
#: Quantizing every op ONNX Runtime can (LayerNormalization, Reshape, Where...) dropped
#: all-MiniLM-L6-v2's embedding cosine to ~0.3 (transformers take their own path).
STATIC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice on the root logger and its calibrators
    print; keep the CLI clean."""
    from compressor_onnx.int4 import quiet_ort

    with quiet_ort():
        yield


def check_quantize_step(step: Step, context: Context) -> None:
    """Refuse parameters core's declaration cannot check, before any work (export included)."""
    from compressor_onnx.int4 import check_int4

    check_int4(step, context)


def resolve_reduce_range(step: Step) -> bool:
    """``reduce_range=auto``: 7-bit weights on x86 CPUs without VNNI or AMX, where ONNX
    Runtime's u8 x s8 kernels (``vpmaddubsw``) can saturate 16-bit sums; off elsewhere."""
    value = str(step.params.get("reduce_range", "auto")).lower()
    if value != "auto":
        return value == "true"
    import platform

    from compressor.plugin import cpu_info

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_info()["flags"])


def static_model_type(step: Step, graph: Any) -> str:
    """``transformer`` or ``generic``: the parameter, or what the graph looks like."""
    from compressor_onnx.transformer_static import is_transformer

    chosen = str(step.params.get("model_type", "auto"))
    if chosen != "auto":
        return chosen
    return "transformer" if is_transformer(graph) else "generic"


def quantize_network(network: Any, step: Step, context: Context) -> tuple[Any, list[str], dict[str, Any]]:
    """``quantize MODE`` on a Network (in memory or on disk): the new Network, notes and metadata."""
    import dataclasses
    import tempfile

    if network.path is not None:
        from compressor_onnx.large import quantize_large

        path, notes, metadata = quantize_large(network.path, step, context)
        return dataclasses.replace(network, path=path), notes, metadata
    with tempfile.TemporaryDirectory(prefix="quantize-", dir=context.workdir) as folder:
        graph, notes, metadata = quantize_graph(network.graph, step, context, Path(folder))
    return dataclasses.replace(network, graph=graph), notes, metadata


def quantize_graph(graph: Any, step: Step, context: Context, workdir: Path) -> tuple[Any, list[str], dict[str, Any]]:
    """Apply ``quantize MODE`` to ``graph`` (which stays as it is): the new graph, notes and metadata."""
    import onnx

    from compressor_frontends.pytorch.onnx_graph import constants_to_initializers
    from compressor_onnx.preprocess import shrink_facts, weight_bytes

    original, graph = graph, onnx.ModelProto()
    graph.CopyFrom(original)
    moved = constants_to_initializers(graph)
    before = weight_bytes(graph)
    notes: list[str] = []
    metadata: dict[str, Any] = {}
    if step.mode == "fp16":
        result = to_fp16(graph)
    else:
        excluded_nodes = parse_names(step.params.get("exclude_nodes"))
        unknown = sorted(set(excluded_nodes) - {node.name for node in graph.graph.node})
        if unknown:
            raise UsageError(f"exclude_nodes names nodes the graph does not have: {', '.join(unknown)}")
        if step.mode == "int4":
            from compressor_onnx.int4 import quantize_int4_graph

            result, notes = quantize_int4_graph(strip_value_info(graph), step, context)
            result = strip_value_info(result)
        else:
            source, target = workdir / "quantize-in.onnx", workdir / "quantize-out.onnx"
            _save_for_quantizer(strip_value_info(graph), source)
            notes, metadata = quantize_int8_file(source, target, step, excluded_nodes, context, graph)
            result = strip_value_info(onnx.load(str(target)))
    shrink_notes, shrink_metadata = shrink_facts(before, weight_bytes(result), moved, step.mode)
    return result, [*notes, *shrink_notes], {**metadata, **shrink_metadata, **mode_facts(step)}


def quantize_int8_file(
    source: Path, target: Path, step: Step, excluded: list[str], context: Context, skeleton: Any
) -> tuple[list[str], dict[str, Any]]:
    """Dynamic or static (transformer or generic) int8 from ``source`` to ``target``.

    ONNX Runtime's quantizer runs in a forked child: a native crash or running out of
    memory there (it segfaults under ``ulimit -v``) is one line, not the end of the run."""
    from compressor.plugin import run_in_fork

    return run_in_fork(_quantize_int8_file, source, target, step, excluded, context, skeleton,
                       step=f"quantize {step.mode}")


def _quantize_int8_file(
    source: Path, target: Path, step: Step, excluded: list[str], context: Context, skeleton: Any
) -> tuple[list[str], dict[str, Any]]:
    reduce_range = resolve_reduce_range(step)
    if step.mode == "dynamic":
        _quantize_dynamic(source, target, step, excluded, reduce_range)
        return [], {"reduce_range": reduce_range}
    model_type = static_model_type(step, skeleton)
    if model_type == "transformer":
        from compressor_onnx.transformer_static import quantize_transformer_file

        notes, metadata = quantize_transformer_file(source, target, step, excluded, context, reduce_range)
        return notes, {**metadata, "model_type": model_type, "reduce_range": reduce_range}
    if _is_large(source):
        notes = quantize_static_file(source, target, step, excluded, context, reduce_range)
        return notes, {"model_type": model_type, "reduce_range": reduce_range}
    from compressor_onnx.int8_choice import quantize_generic_static

    notes, metadata = quantize_generic_static(source, target, step, excluded, context, reduce_range)
    return notes, {**metadata, "model_type": model_type, "reduce_range": reduce_range}


def mode_facts(step: Step) -> dict[str, Any]:
    if step.mode != "int4":
        return {}
    from compressor_onnx.int4 import Int4Settings

    settings = Int4Settings.from_step(step)
    return {"int4": {"block_size": settings.block_size, "symmetric": settings.symmetric,
                     "algorithm": settings.algorithm, "accuracy_level": settings.accuracy_level}}


def _quantize_dynamic(source: Path, target: Path, step: Step, excluded_nodes: list[str], reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    try:
        with _quiet_quantizer():
            quantize_dynamic(
                source,
                target,
                weight_type=QuantType.QInt8,
                per_channel=bool(step.params.get("per_channel", True)),
                reduce_range=reduce_range,
                nodes_to_exclude=excluded_nodes,
                op_types_to_quantize=op_types(IntegerOpsRegistry, step),
                use_external_data_format=_is_large(source),
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
        with _quiet_quantizer():
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
                use_external_data_format=_is_large(source),
            )
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - the quantizer raises anything on odd graphs
        kept = keep_for_debugging([target], "failed-int8")
        raise CompressionError(
            f"static {step.mode} quantization failed ({shown_reason(error)}){kept_suffix(kept)}") from None
    return notes


def calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


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


def to_fp16(graph: Any, infer_shapes: bool = True) -> Any:
    """Float16 weights and compute; the model's inputs and outputs stay float32.

    Converts ``graph`` in place; ``infer_shapes=False`` when its value types are
    already inferred (large models are inferred by path).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        with _quiet_quantizer():
            return convert_float_to_float16(graph, keep_io_types=True, disable_shape_infer=not infer_shapes)
    except Exception as error:  # noqa: BLE001 - the converter raises anything on odd graphs
        raise CompressionError(f"fp16 conversion failed ({shown_reason(error)})") from None


def float_nodes(graph: Any) -> list[str]:
    """Weighted nodes that read a floating-point initializer directly: they stayed float."""
    from onnx import TensorProto

    floating = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    float_weights = {t.name for t in graph.graph.initializer if t.data_type in floating}
    return [
        node.name or f"{node.op_type}#{index}"
        for index, node in enumerate(graph.graph.node)
        if node.op_type in WEIGHTED_OPS and any(name in float_weights for name in node.input)
    ]


def op_types(candidates: Iterable[str], step: Step) -> list[str]:
    excluded = set(parse_names(step.params.get("exclude_op_types")))
    return [op for op in candidates if op not in excluded]


def parse_names(value: Any) -> list[str]:
    return [name.strip() for name in str(value or "").split(",") if name.strip()]


def _is_large(path: Path) -> bool:
    return path.stat().st_size > large_model_bytes() or (path.parent / f"{path.name}.data").exists()


def _save_for_quantizer(graph: Any, path: Path) -> None:
    """Save ``graph`` where ONNX Runtime's quantizer reads it (external data past 2 GB)."""
    import onnx

    if graph.ByteSize() > large_model_bytes():
        onnx.save_model(graph, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save_model(graph, str(path))
