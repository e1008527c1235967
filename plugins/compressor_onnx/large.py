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

from compressor import CompressionError, Context, Step, UsageError
from compressor.errors import first_line
from compressor_onnx.external import Producer, is_external, load_skeleton, read_array, write_model

#: fp16 conversion keeps these suffixed copies of an initializer (Cast outputs for
#: float32-only ops); their shapes are the initializer's.
_CAST_SUFFIXES = ("_cast_to_fp32", "_cast_to_bfloat16")


def scratch_model(context: Context, stem: str) -> Path:
    """A new ``<stem>.onnx`` path in its own folder under the run's scratch folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=context.workdir))
    return folder / f"{stem}.onnx"


def quantize_large(source: Path, step: Step, context: Context) -> Path:
    """``quantize MODE`` on the model at ``source``; the result's path."""
    import onnx

    from compressor_onnx.export import strip_value_info
    from compressor_onnx.quantization import parse_names, quantize_static_file

    if step.mode == "fp16":
        target = scratch_model(context, "fp16")
        try:
            converted, producers = fp16_skeleton(source, target.parent)
        except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as error:
            raise CompressionError(f"fp16 conversion failed ({first_line(error)})") from None
        return _write(converted, target, source.parent, producers, context)
    skeleton = load_skeleton(source)
    excluded = parse_names(step.params.get("exclude_nodes"))
    unknown = sorted(set(excluded) - {node.name for node in skeleton.graph.node})
    if unknown:
        raise UsageError(f"exclude_nodes names nodes the graph does not have: {', '.join(unknown)}")
    if step.mode == "dynamic":
        return _dynamic(skeleton, source, step, excluded, context)
    # ONNX Runtime's static quantizer calibrates and quantizes from a file:
    # give it one data file in our own folder, value_info dropped as on the small path.
    target = scratch_model(context, "quantize-in")
    write_model(strip_value_info(skeleton), target, source.parent, progress=context.progress)
    output = target.with_name("quantize-out.onnx")
    quantize_static_file(target, output, step, excluded, context)
    onnx.save_model(strip_value_info(load_skeleton(output)), str(output))
    return output


def _dynamic(skeleton: Any, source: Path, step: Step, excluded: list[str], context: Context) -> Path:
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    from compressor_onnx.int8_stream import quantize_dynamic_int8
    from compressor_onnx.quantization import op_types

    try:
        producers = quantize_dynamic_int8(
            skeleton, source.parent, bool(step.params.get("per_channel", True)), excluded,
            op_types(IntegerOpsRegistry, step),
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

    from compressor_onnx.quantization import to_fp16

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
