"""Residual add + RMSNorm as ONNX Runtime's ``SkipSimplifiedLayerNormalization`` (issue 27).

The TorchScript export of a transformers RMSNorm (Llama's, Qwen2's, Mistral's) is
``x * (1 / sqrt(mean(x ** 2) + eps))`` times the weight: Pow, ReduceMean, Add, Sqrt, Div (or
Reciprocal), Mul, a cast to the type it already has, and the weight's Mul. Where ``x`` is a
residual sum (``hidden + attention``, ``hidden + mlp``: every norm but the first layer's),
this pass writes the sum and the norm as one ``SkipSimplifiedLayerNormalization``
(com.microsoft), whose fourth output is the sum the next residual reads -- what ONNX Runtime
GenAI's model builder writes. ONNX Runtime fuses a norm into ``SimplifiedLayerNormalization``
itself when it loads a graph, but not the add before it; the first layer's norm is left to it
(that op is registered in the ONNX domain, where ``onnx.checker`` refuses it).

A float32 graph only (the exporter's float16 norms compute in float32: casts that are not
no-ops). The caller proves the pass on the model's miniature
(:func:`compressor_onnx.kv_fusion_export.fuse_export`); a norm whose nodes differ in the
least from this shape stays as exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor_onnx.kv_fusion import _Graph, splice

SKIP_SIMPLIFIED = "SkipSimplifiedLayerNormalization"
_MS = "com.microsoft"
_FLOAT = 1  # TensorProto.FLOAT


@dataclass(frozen=True)
class _Norm:
    """One RMSNorm as exported: ``source`` normalized, times ``weight``, written to ``output``."""

    source: str
    weight: str
    epsilon: float
    output: str
    replaced: tuple[Any, ...]


def fuse_norms(model: Any) -> int:
    """Rewrite every residual add + RMSNorm of ``model`` (a float32 ModelProto, changed in
    place) that this pass recognizes; returns how many."""
    from onnx import helper

    graph = model.graph
    if any(value.type.tensor_type.elem_type != _FLOAT for value in graph.input
           if value.name.startswith("past_key_values.")):
        return 0
    view = _Graph(graph)
    replaced: set[int] = set()
    nodes = []
    for node in list(graph.node):
        norm = _norm_at(view, node) if node.op_type == "Pow" else None
        residual = _residual_add(view, norm.source, replaced) if norm is not None else None
        if norm is None or residual is None:
            continue
        replaced.update({id(residual), *(id(part) for part in norm.replaced)})
        name = f"/compressor/fused/norm.{len(nodes) // 2}"
        nodes.append(helper.make_node(
            SKIP_SIMPLIFIED, [residual.input[0], residual.input[1], norm.weight],
            [f"{name}/output", "", "", residual.output[0]], name=name, domain=_MS, epsilon=norm.epsilon))
        # As after the attention: a cast to the type it has (dropped at load) types the value
        # for ONNX's shape inference, which knows no fused norm, and for the quantizers.
        nodes.append(helper.make_node("Cast", [f"{name}/output"], [norm.output], name=f"{name}/typed", to=_FLOAT))
    if not nodes:
        return 0
    available = {value.name for value in graph.input} | set(view.initializers)
    if splice(graph, replaced, nodes, available) is None:
        return 0
    if not any(entry.domain == _MS for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    return len(nodes) // 2


def _norm_at(view: _Graph, power: Any) -> _Norm | None:
    """The RMSNorm whose square is ``power``, or None where the nodes differ from the export's."""
    source = power.input[0]
    exponent = view.constant(power.input[1]) if len(power.input) == 2 else None
    if exponent is None or exponent.size != 1 or float(exponent.reshape(())) != 2.0:
        return None
    mean = _only_reader(view, power.output[0], "ReduceMean")
    if mean is None or not _last_axis_mean(view, mean):
        return None
    shift = _only_reader(view, mean.output[0], "Add")
    epsilon = _other_constant(view, shift, mean.output[0]) if shift is not None else None
    if epsilon is None or epsilon.size != 1:
        return None
    root = _only_reader(view, shift.output[0], "Sqrt")
    inverse = _only_reader(view, root.output[0]) if root is not None else None
    if inverse is None or not (inverse.op_type == "Reciprocal" or (
            inverse.op_type == "Div" and inverse.input[1] == root.output[0]
            and _is_one(view.constant(inverse.input[0])))):
        return None
    scaled = _only_reader(view, inverse.output[0], "Mul")
    if scaled is None or set(scaled.input) != {source, inverse.output[0]}:
        return None
    chain = [power, mean, shift, root, inverse, scaled]
    last = _only_reader(view, scaled.output[0])
    if last is not None and last.op_type == "Cast" and _cast_to(last) == _FLOAT:
        chain.append(last)
        last = _only_reader(view, last.output[0])
    if last is None or last.op_type != "Mul" or last.domain not in ("", "ai.onnx"):
        return None
    weight = _weight(view, next((name for name in last.input if name != chain[-1].output[0]), ""))
    if weight is None or list(last.input).count(chain[-1].output[0]) != 1:
        return None
    return _Norm(source, weight, float(epsilon.reshape(())), last.output[0], (*chain, last))


def _only_reader(view: _Graph, name: str, op_type: str | None = None) -> Any | None:
    """The one node reading ``name`` (of ``op_type``, default domain), or None."""
    readers = view.consumers.get(name, [])
    if len(readers) != 1 or readers[0].domain not in ("", "ai.onnx") or name in view.outputs:
        return None
    return readers[0] if op_type is None or readers[0].op_type == op_type else None


def _last_axis_mean(view: _Graph, mean: Any) -> bool:
    """Whether ``mean`` averages the last axis alone, keeping it (attribute or, opset 18, input)."""
    from onnx import helper

    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in mean.attribute}
    axes = attributes.get("axes")
    if axes is None and len(mean.input) == 2:
        constant = view.constant(mean.input[1])
        axes = None if constant is None else [int(axis) for axis in constant.reshape(-1)]
    return axes is not None and list(axes) == [-1] and attributes.get("keepdims", 1) == 1 \
        and attributes.get("noop_with_empty_axes", 0) == 0


def _other_constant(view: _Graph, node: Any, name: str) -> Any | None:
    others = [value for value in node.input if value != name]
    return view.constant(others[0]) if len(node.input) == 2 and len(others) == 1 else None


def _is_one(value: Any | None) -> bool:
    return value is not None and value.size == 1 and float(value.reshape(())) == 1.0


def _cast_to(node: Any) -> int | None:
    return next((attribute.i for attribute in node.attribute if attribute.name == "to"), None)


def _weight(view: _Graph, name: str) -> str | None:
    """The float32 vector initializer ``name`` is (through the exporter's identities), or None."""
    while (node := view.producer.get(name)) is not None and node.op_type == "Identity":
        name = node.input[0]
    tensor = view.initializers.get(name)
    if tensor is None or tensor.data_type != _FLOAT or len(tensor.dims) != 1:
        return None
    return name


def _residual_add(view: _Graph, source: str, taken: set[int]) -> Any | None:
    """The residual ``Add`` of two computed values that ``source`` is (through a float cast),
    when no other fused norm took it; None otherwise."""
    node = view.producer.get(source)
    if node is not None and node.op_type == "Cast" and _cast_to(node) == _FLOAT:
        node = view.producer.get(node.input[0])
    if node is None or node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2 \
            or id(node) in taken:
        return None
    if any(name in view.initializers or view.constant(name) is not None or name not in view.producer
           for name in node.input):
        return None
    return node
