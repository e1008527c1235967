"""Steps on models past the large-model threshold, kept as ONNX files on disk.

Each step reads the input's skeleton (the graph without its external data),
rewrites it, and writes a new ``.onnx`` plus one ``.onnx.data`` into the run's
scratch folder, producing the new weights one tensor at a time: peak memory is
about one weight tensor and its quantized copy, not the model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Context, Step, UsageError, first_line
from compressor_onnx.external import (
    Producer,
    is_external,
    load_skeleton,
    read_array,
    write_model,
)

#: fp16 conversion keeps these suffixed copies of an initializer (Cast outputs for
#: float32-only ops); their shapes are the initializer's.
_CAST_SUFFIXES = ("_cast_to_fp32", "_cast_to_bfloat16")


def scratch_model(context: Context, stem: str) -> Path:
    """A new ``<stem>.onnx`` path in its own folder under the run's scratch folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=context.workdir))
    return folder / f"{stem}.onnx"


def quantize_large(source: Path, step: Step, context: Context) -> tuple[Path, list[str], dict[str, Any]]:
    """``quantize MODE`` on the model at ``source``: the result's path, notes and metadata."""
    from compressor_frontends.pytorch.onnx_graph import constants_to_initializers
    from compressor_onnx.int4_settings import for_model, mode_facts
    from compressor_onnx.preprocess import shrink_facts, weight_bytes

    skeleton = load_skeleton(source)
    step = for_model(step, skeleton)
    moved = constants_to_initializers(skeleton)
    if moved:
        # Later steps read the model by path (shape inference, ONNX Runtime): give them one without Constants.
        converted = scratch_model(context, "constants")
        _write(skeleton, converted, source.parent, {}, context)
        source, skeleton = converted, load_skeleton(converted)
    before = weight_bytes(skeleton)
    path, notes, metadata = _quantize_large(source, skeleton, step, context)
    shrink_notes, shrink_metadata = shrink_facts(before, weight_bytes(load_skeleton(path)), moved, step.mode)
    return path, [*notes, *shrink_notes], {**metadata, **shrink_metadata, **mode_facts(step)}


def _quantize_large(source: Path, skeleton: Any, step: Step, context: Context) -> tuple[Path, list[str], dict[str, Any]]:
    import onnx

    from compressor_onnx.int8_static_stream import quantize_static_large
    from compressor_onnx.quantize_common import parse_names, resolve_reduce_range

    if step.mode == "fp16":
        target = scratch_model(context, "fp16")
        try:
            converted, producers = fp16_skeleton(source, target.parent)
        except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as error:
            raise CompressionError(f"fp16 conversion failed ({first_line(error)})") from None
        return _write(converted, target, source.parent, producers, context), [], {}
    excluded = parse_names(step.params.get("exclude_nodes"))
    unknown = sorted(set(excluded) - {node.name for node in skeleton.graph.node})
    if unknown:
        raise UsageError(f"exclude_nodes names nodes the graph does not have: {', '.join(unknown)}")
    if step.mode == "int4":
        path, notes = _int4(skeleton, source, step, context)
        return path, notes, {}
    if step.mode == "dynamic":
        reduce_range = resolve_reduce_range(step)
        return _dynamic(skeleton, source, step, excluded, context, reduce_range), [], {"reduce_range": reduce_range}
    # Static int8/uint8: QDQ written one weight tensor at a time (transformers: their own path).
    return quantize_static_large(source, skeleton, step, excluded, context)


def _int4(skeleton: Any, source: Path, step: Step, context: Context) -> tuple[Path, list[str]]:
    from compressor_onnx.int4_settings import Int4Settings
    from compressor_onnx.int4_stream import quantize_int4_stream

    settings = Int4Settings.from_step(step)
    if settings.algorithm in ("gptq", "awq"):  # calibrated: gptq.py runs awq.py for awq
        return _gptq(source, step, context)
    try:
        producers = quantize_int4_stream(skeleton, source.parent, settings)
    except (ValueError, KeyError, IndexError, RuntimeError) as error:
        raise CompressionError(f"int4 quantization failed ({first_line(error)})") from None
    return _write(skeleton, scratch_model(context, "int4"), source.parent, producers, context), []


def _gptq(source: Path, step: Step, context: Context) -> tuple[Path, list[str]]:
    """GPTQ reads each layer's inputs from an ONNX Runtime session on the model (Gemms
    split first, written to scratch), then writes its weights one at a time."""
    from compressor_frontends.pytorch.export import strip_value_info
    from compressor_onnx.int4_rewrites import split_gemms
    from compressor_onnx.int4_settings import Int4Settings
    from compressor_onnx.int4_stream import gptq_stream

    settings = Int4Settings.from_step(step)
    copy = scratch_model(context, "gptq-in")
    skeleton = strip_value_info(load_skeleton(source))
    original = load_skeleton(source)  # read from: the writer repoints the skeleton's tensors
    producers = split_gemms(skeleton, lambda name: _read(original, source.parent, name), settings)
    write_model(skeleton, copy, source.parent, producers, context.progress)
    quantized, producers, notes = gptq_stream(copy, settings, context, int(step.params.get("calibration_samples", 128)))
    return _write(quantized, scratch_model(context, "int4"), copy.parent, producers, context), notes


def _read(model: Any, folder: Path, name: str) -> Any:
    return read_array(next(t for t in model.graph.initializer if t.name == name), folder)


def _dynamic(skeleton: Any, source: Path, step: Step, excluded: list[str], context: Context,
             reduce_range: bool) -> Path:
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    from compressor_onnx.int8_stream import quantize_dynamic_int8
    from compressor_onnx.quantize_common import op_types

    try:
        producers = quantize_dynamic_int8(
            skeleton, source.parent, bool(step.params.get("per_channel", True)), excluded,
            op_types(IntegerOpsRegistry, step), reduce_range=reduce_range,
        )
    except (ValueError, KeyError, IndexError) as error:
        raise CompressionError(f"dynamic quantization failed ({first_line(error)})") from None
    return _write(skeleton, scratch_model(context, "dynamic"), source.parent, producers, context)


def _write(skeleton: Any, target: Path, folder: Path, producers: dict[str, Producer], context: Context) -> Path:
    try:
        write_model(skeleton, target, folder, producers, context.progress)
    except (ValueError, OSError) as error:
        raise CompressionError(f"writing the large model failed ({first_line(error)})") from None
    return target


def fp16_skeleton(source: Path, scratch: Path) -> tuple[Any, dict[str, Producer]]:
    """ONNX Runtime's float16 conversion of the model at ``source``: the new
    skeleton and producers of its new weights.

    The converter reads every initializer it converts, so external ones are
    swapped for one-element stand-ins while it runs; their real contents are
    converted one at a time when the model is written.
    """
    import onnx
    from onnx import TensorProto
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from compressor_onnx.quantize_common import to_fp16

    # Types of every intermediate value, inferred by path so the size never matters.
    inferred_path = scratch / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(source), str(inferred_path))
    model = load_skeleton(inferred_path)
    inferred_path.unlink()
    stand_ins: dict[str, Any] = {}
    for tensor in model.graph.initializer:
        if is_external(tensor) and tensor.data_type == TensorProto.FLOAT:
            stand_ins[tensor.name] = TensorProto()
            stand_ins[tensor.name].CopyFrom(tensor)
            _stand_in(tensor)
    converted = to_fp16(model, infer_shapes=False)
    real_dims = {name: list(tensor.dims) for name, tensor in stand_ins.items()}
    producers: dict[str, Producer] = {}
    for tensor in converted.graph.initializer:
        if tensor.name not in stand_ins:
            continue
        target_type = tensor.data_type
        tensor.CopyFrom(stand_ins[tensor.name])
        if target_type == TensorProto.FLOAT16:
            producers[tensor.name] = _fp16_producer(tensor, source.parent, convert_np_to_float16)
    for value in converted.graph.value_info:
        base = next((value.name.removesuffix(s) for s in _CAST_SUFFIXES if value.name.endswith(s)), value.name)
        if base in real_dims:
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for dim in real_dims[base]:
                shape.dim.add().dim_value = dim
    return converted, producers


def _stand_in(tensor: Any) -> None:
    """One float32 zero in place of the tensor's data and shape."""
    from onnx import TensorProto

    rank = len(tensor.dims)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    del tensor.dims[:]
    tensor.dims.extend([1] * rank)
    tensor.raw_data = b"\0\0\0\0"


def _fp16_producer(tensor: Any, folder: Path, convert: Any) -> Producer:
    reference = type(tensor)()
    reference.CopyFrom(tensor)
    return lambda: convert(read_array(reference, folder))


def prune_large(source: Path, sparsity: float, context: Context) -> tuple[Path, int]:
    """Magnitude-prune the weights of the model at ``source``; the result and the layers pruned."""
    from compressor_onnx.pruning import prunable_weights, prune_array

    skeleton = load_skeleton(source)
    names = prunable_weights(skeleton, sparsity)
    tensors = {tensor.name: tensor for tensor in skeleton.graph.initializer}

    def producer(name: str) -> Producer:
        reference = type(tensors[name])()
        reference.CopyFrom(tensors[name])
        return lambda: prune_array(read_array(reference, source.parent), sparsity)

    producers = {name: producer(name) for name in names}
    return _write(skeleton, scratch_model(context, "pruned"), source.parent, producers, context), len(names)
