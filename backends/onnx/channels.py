"""Channel pruning of a graph: whole output neurons (MatMul/Gemm) or filters (Conv) go.

Which channels go is decided by :func:`compressor_frontends.pytorch.channels.plan_channels`
(chains of a layer, elementwise nodes and the next layer; the lowest L2 norms of
incoming weights); here the kept outputs are cut out of each layer's weight and bias
and the matching inputs out of the next layer's weight, so both matrices really shrink.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor_frontends.pytorch.channels import ChannelResult, float_constant, plan_channels
from compressor_onnx.external import Producer
from compressor_onnx.rewrite import all_names, capture, placeholder, unique_name


def channel_edit(model: Any, folder: Path, ratio: float) -> tuple[dict[str, Producer], ChannelResult]:
    """Prune ``ratio`` of the channels of every prunable chain of ``model`` (in place: the
    protos' shapes; contents come from the producers returned)."""
    from compressor_onnx.external import read_array

    plan = plan_channels(model, ratio, lambda tensor: read_array(tensor, folder))
    index = plan.index
    #: initializer name -> {axis: kept indices}
    slices: dict[str, dict[int, Any]] = {name: dict(axes) for name, axes in plan.result.kept.items()}
    #: a layer's own copy of a shared bias -> the bias it copies
    sources: dict[str, Any] = {}
    taken = all_names(model)
    for cut in plan.cuts:
        if cut.bias is None:
            continue
        bias_node, position = cut.bias
        bias = float_constant(index, bias_node.input[position])
        assert bias is not None  # the plan found it a float constant
        if bias.name != bias_node.input[position] or len(index.consumers[bias.name]) > 1:
            # Exporters share equal tensors (all-zero biases) between layers: give this one its own
            # (and a Constant node's bias its initializer).
            base = bias.name or bias_node.input[position]
            copy = placeholder(unique_name(taken, f"{base}_pruned"), bias.data_type)
            copy.dims.extend(bias.dims)
            model.graph.initializer.append(copy)
            sources[copy.name] = bias
            bias_node.input[position] = copy.name
            bias = copy
        slices.setdefault(bias.name, {})[len(bias.dims) - 1] = cut.kept
    producers = {}
    for tensor in model.graph.initializer:
        if tensor.name in slices:
            producers[tensor.name] = _sliced(capture(sources.get(tensor.name, tensor), folder), slices[tensor.name])
            _set_dims(tensor, slices[tensor.name])
    del model.graph.value_info[:]  # intermediate shapes changed; ONNX Runtime infers them again
    return producers, plan.result


def _sliced(read: Producer, axes: dict[int, Any]) -> Producer:
    def produce() -> Any:
        import numpy as np

        array = read()
        for axis, kept in axes.items():
            array = np.take(array, kept, axis=axis)
        return np.ascontiguousarray(array)

    return produce


def _set_dims(tensor: Any, axes: dict[int, Any]) -> None:
    dims = list(tensor.dims)
    for axis, kept in axes.items():
        dims[axis] = len(kept)
    del tensor.dims[:]
    tensor.dims.extend(dims)
