"""The fused attention's bias made from the attention mask in six nodes (issue 27).

:func:`compressor_onnx.kv_fusion.fuse_attention` gives every ``GroupQueryAttention`` the
export's own additive mask as ``attention_bias``: the causal mask and the padding, built by
the exporter in some thirty small nodes (shapes, ranges, comparisons) that each decode step
runs -- a few percent of a step at batch 1 once the weights are int4. ``GroupQueryAttention``
is causal itself, so the bias needs to say only which positions are padding:
``0`` where ``attention_mask`` is set, the type's lowest value where it is not (the exporter's
value: a padded query row stays finite), expanded to ``[batch, 1, sequence, total]``.

Only for a model whose mask is causal and padding alone: the caller
(:func:`compressor_onnx.kv_fusion_export.fuse_graph`) leaves the export's bias to a model with
a sliding window or chunked attention, which the miniature's short check could not show.
"""

from __future__ import annotations

from typing import Any

from compressor_onnx.kv_fusion import _live

_MS = "com.microsoft"
_BIAS_INPUT = 10
_PREFIX = "/compressor/fused/padding"


def padding_bias(model: Any) -> bool:
    """Feed every fused attention of ``model`` (changed in place) a padding-only bias built
    from ``attention_mask``; the export's mask nodes no longer read are dropped. False (and
    nothing changed) where the layers do not all read one bias."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention" and node.domain == _MS
                 and node.name.startswith("/compressor/fused/")]
    biases = {node.input[_BIAS_INPUT] if len(node.input) > _BIAS_INPUT else "" for node in attention}
    inputs = {value.name: value for value in graph.input}
    if len(biases) != 1 or "" in biases or not {"attention_mask", "input_ids"} <= set(inputs):
        return False
    element_type = inputs["past_key_values.0.key"].type.tensor_type.elem_type if "past_key_values.0.key" in inputs \
        else TensorProto.FLOAT
    dtype = helper.tensor_dtype_to_np_dtype(element_type)

    def constant(name: str, value: Any) -> Any:
        return helper.make_node("Constant", [], [f"{_PREFIX}/{name}"], name=f"{_PREFIX}/{name}",
                                value=numpy_helper.from_array(np.asarray(value)))

    def node(op: str, inputs: list[str], output: str, **attributes: Any) -> Any:
        return helper.make_node(op, [f"{_PREFIX}/{name}" if name not in ("attention_mask", "input_ids") else name
                                     for name in inputs], [f"{_PREFIX}/{output}"], name=f"{_PREFIX}/{output}",
                                **attributes)

    nodes = [
        constant("zero", np.zeros((), dtype)),
        constant("lowest", np.array(np.finfo(dtype).min, dtype)),
        constant("head_axes", np.array([1, 2], np.int64)),
        constant("leading_ones", np.array([1, 1], np.int64)),
        constant("trailing_one", np.array([1], np.int64)),
        node("Cast", ["attention_mask"], "kept", to=TensorProto.BOOL),
        node("Where", ["kept", "zero", "lowest"], "rows"),
        node("Unsqueeze", ["rows", "head_axes"], "columns"),
        node("Shape", ["input_ids"], "sequence", start=1, end=2),
        node("Concat", ["leading_ones", "sequence", "trailing_one"], "shape", axis=0),
        node("Expand", ["columns", "shape"], "bias"),
    ]
    for layer in attention:
        layer.input[_BIAS_INPUT] = f"{_PREFIX}/bias"
    first = min(list(graph.node).index(layer) for layer in attention)
    ordered = [*graph.node[:first], *nodes, *graph.node[first:]]
    live = _live(ordered, {value.name for value in graph.output})
    del graph.node[:]
    graph.node.extend(live)
    read = {name for kept in live for name in kept.input}
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in read]:
        graph.initializer.remove(tensor)
    return True
