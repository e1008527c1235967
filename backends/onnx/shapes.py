"""The inputs of an ONNX graph as TensorSpecs (a PyTorch model's come from
:mod:`compressor_frontends.pytorch.shapes`)."""

from __future__ import annotations

from typing import Any

from compressor.plugin import TensorSpec, UnsupportedError


def graph_input_specs(graph: Any, path: Any = None) -> tuple[TensorSpec, ...]:
    """TensorSpecs of an ONNX graph's real inputs (initializers excluded). Inputs that
    are not numeric tensors (sequences, maps, strings) are unsupported, in one line."""
    from onnx import TensorProto, helper

    initializers = {tensor.name for tensor in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise UnsupportedError(
                f"input {value.name!r} is a {kind or 'typeless value'}: compressor feeds tensors only", path
            )
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            kind_name = "string tensor" if tensor_type.elem_type == TensorProto.STRING else "tensor of no type"
            raise UnsupportedError(
                f"input {value.name!r} is a {kind_name}: compressor feeds numbers only", path
            )
        dims = tuple(
            dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim
        )
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(TensorSpec(value.name, dims, dtype))
    return tuple(specs)
