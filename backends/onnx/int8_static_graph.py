"""The QDQ graph ONNX Runtime's ``quantize_static`` writes, built on a skeleton.

int8_static_stream.py uses this to quantize models past the large-model threshold
without loading their weights: the same nodes, initializer names, types and
shapes as ``QDQQuantizer`` (onnxruntime/quantization/qdq_quantizer.py) for the
ops it covers here, with every value that depends on a weight's contents left to
a producer. The steps follow ``QDQQuantizer.quantize_model``:

1. :func:`plan_qdq` marks tensors as the op quantizers do (``QDQMatMul``,
   ``QDQGemm``, ``QDQConv``, ``QDQGather``): activation inputs and outputs, weights
   (per channel on the op's axis when asked and valid, else per tensor), Gemm/Conv
   biases (int32, scale = input scale x weight scale x beta; a bias shared by two
   nodes is duplicated, Gemm's beta set to 1), a Gather's output sharing its data's
   scale and zero point;
2. :func:`add_qdq` adds, in the marking order, ``DequantizeLinear`` after each
   quantized initializer and a ``QuantizeLinear``/``DequantizeLinear`` pair on each
   activation (the consumers read ``<name>_DequantizeLinear_Output``; a graph output
   keeps its name and its producer writes ``<name>_QuantizeLinear_Input``), then the
   shared pairs, then each bias's ``DequantizeLinear``; unused initializers go and the
   nodes are sorted with ONNX Runtime's own topological sort.

A tensor is quantized when it is float32 (an initializer, or typed so by shape inference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The ops this path quantizes (ONNX Runtime's QDQ registry entries for them).
QDQ_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"})


@dataclass
class Marked:
    """A tensor to quantize: ``weight`` (int8, symmetric) or ``activation`` (the activation type)."""

    kind: str
    axis: int | None = None
    #: The tensor whose scale and zero point this one shares (a Gather's output).
    provider: str | None = None


@dataclass
class Bias:
    node: str
    input: str
    weight: str
    beta: float
    #: The float initializer holding its values (the original, for a duplicated bias).
    source: str


@dataclass
class QdqPlan:
    tensors: dict[str, Marked] = field(default_factory=dict)
    biases: dict[str, Bias] = field(default_factory=dict)
    #: The op type of each node quantized.
    ops: list[str] = field(default_factory=list)

    def calibrated(self, initializers: Mapping[str, Any]) -> list[str]:
        """The activations whose ranges the quantizer reads."""
        return [name for name in self.tensors if name not in initializers]


def plan_qdq(model: Any, floats: set[str], op_types: set[str], excluded: set[str], per_channel: bool,
             only: set[str] | None = None, outputs_of: frozenset[str] = QDQ_OPS) -> QdqPlan:
    """Mark what ``QDQQuantizer`` would quantize in ``model`` (a skeleton: Gemm betas and
    duplicated biases are changed in place). ``floats``: names of float32 values; ``only``:
    ``nodes_to_quantize``; ``outputs_of``: the op types whose outputs are quantized (the
    others are ``OpTypesToExcludeOutputQuantization``)."""
    from onnx import TensorProto, helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    plan = QdqPlan()

    def is_float(name: str) -> bool:
        tensor = initializers.get(name)
        return tensor.data_type == TensorProto.FLOAT if tensor is not None else name in floats

    def mark(name: str, kind: str) -> None:
        if is_float(name) and name not in plan.tensors:
            plan.tensors[name] = Marked(kind)

    def mark_weight(name: str, default_axis: int) -> None:
        tensor = initializers.get(name)
        rank = len(tensor.dims) if tensor is not None else 0
        if per_channel and tensor is not None and -rank <= default_axis < rank:
            if tensor.data_type == TensorProto.FLOAT:  # a per-channel mark replaces an earlier one
                plan.tensors[name] = Marked("weight", default_axis % rank)
        else:
            mark(name, "weight")

    def add_bias(node: Any, bias: str, beta: float) -> bool:
        tensor = initializers.get(bias)
        if tensor is None or tensor.data_type != TensorProto.FLOAT:
            return False
        name = bias
        if bias in plan.biases:  # each consumer gets its own copy: its scale depends on the node's inputs
            name = f"{bias}{_largest_suffix(graph, bias) + 1}"
            copy = graph.initializer.add()
            copy.CopyFrom(tensor)
            copy.name = name
            initializers[name] = copy
            for other in graph.node:
                if other.name == node.name:
                    other.input[:] = [name if value == bias else value for value in other.input]
        plan.biases[name] = Bias(node.name, node.input[0], node.input[1], beta, bias)
        return True

    for node in graph.node:
        if (node.op_type not in op_types or node.name in excluded or node.domain not in ("", "ai.onnx")
                or (only and node.name not in only)):
            continue
        plan.ops.append(node.op_type)
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        outputs = list(node.output) if node.op_type in outputs_of else []
        if node.op_type == "MatMul":
            for name in [*node.input, *outputs]:
                if name in initializers:
                    mark_weight(name, 1)
                else:
                    mark(name, "activation")
        elif node.op_type in ("Gemm", "Conv", "ConvTranspose"):
            mark(node.input[0], "activation")
            if outputs:
                mark(outputs[0], "activation")
            transposed = node.op_type == "Gemm" and attributes.get("transB", 0) > 0
            mark_weight(node.input[1], 0 if transposed or node.op_type == "Conv" else 1)
            if len(node.input) == 3:
                beta = float(attributes.get("beta", 1.0)) if node.op_type == "Gemm" else 1.0
                if add_bias(node, node.input[2], beta) and node.op_type == "Gemm":
                    for attribute in node.attribute:
                        if attribute.name == "beta":
                            attribute.f = 1.0
        elif node.op_type == "Gather":
            data = node.input[0]
            shared = (data in initializers and initializers[data].data_type == TensorProto.FLOAT)
            if shared:
                mark(data, "activation")
            if (shared or data in plan.tensors or data in plan.biases) and is_float(node.output[0]):
                plan.tensors[node.output[0]] = Marked("activation", provider=data)
    return plan


def _largest_suffix(graph: Any, prefix: str) -> int:
    """ONNX Runtime's ``get_largest_initializer_name_suffix``."""
    suffix = -1
    for tensor in graph.initializer:
        if tensor.name.startswith(prefix) and tensor.name[len(prefix):].isdigit():
            suffix = max(suffix, int(tensor.name[len(prefix):]))
    return suffix


#: Values of a quantized tensor: ``(zero_point, scale)`` arrays, computed when first asked.
Params = Callable[[str], tuple[Any, Any]]


@dataclass
class Emitted:
    """What :func:`add_qdq` added whose contents come from data: ``{initializer: (tensor, part)}``
    with part ``zero_point``, ``scale``, ``quantized`` (of an initializer) or ``bias_*``."""

    parts: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Each quantized tensor's ``(scale, zero point)`` initializer names.
    names: dict[str, tuple[str, str]] = field(default_factory=dict)


def add_qdq(model: Any, plan: QdqPlan, activation_params: Mapping[str, tuple[Any, Any]],
            initializer_types: Mapping[str, int]) -> Emitted:
    """Rewrite ``model`` (in place) as ``QDQQuantizer`` does; initializer contents that depend
    on weights are left empty, listed in the result. ``activation_params``: ``(zero_point,
    scale)`` of each calibrated activation; ``initializer_types``: the quantized type of each
    marked initializer."""
    from onnx import TensorProto, helper
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.quant_utils import __producer__, __version__

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    outputs = {value.name for value in graph.output}
    emitted = Emitted()
    added: list[Any] = []

    def rename_inputs(old: str, new: str) -> None:
        for node in graph.node:
            node.input[:] = [new if value == old else value for value in node.input]

    def placeholder(name: str, data_type: int, dims: list[int], tensor: str, part: str) -> None:
        graph.initializer.append(TensorProto(name=name, data_type=data_type, dims=dims))
        emitted.parts[name] = (tensor, part)

    def activation_pair(name: str, scale: str, zero_point: str) -> None:
        q_input, dq_output = name, name + "_DequantizeLinear_Output"
        if name in outputs:
            q_input, dq_output = name + "_QuantizeLinear_Input", name
            for node in graph.node:
                node.output[:] = [q_input if value == name else value for value in node.output]
        else:
            rename_inputs(name, dq_output)
        quantized = name + "_QuantizeLinear_Output"
        added.append(helper.make_node("QuantizeLinear", [q_input, scale, zero_point], [quantized],
                                      name + "_QuantizeLinear"))
        added.append(helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [dq_output],
                                      name + "_DequantizeLinear"))
        emitted.names[name] = (scale, zero_point)

    produced_by_dq = {output for node in graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    for name, marked in plan.tensors.items():
        if marked.provider is not None:
            continue
        scale, zero_point = name + "_scale", name + "_zero_point"
        if name in initializers:
            qtype, channels = initializer_types[name], _channels(initializers[name], marked.axis)
            placeholder(zero_point, qtype, channels, name, "zero_point")
            placeholder(scale, TensorProto.FLOAT, channels, name, "scale")
            rename_inputs(name, name + "_DequantizeLinear_Output")
            placeholder(name + "_quantized", qtype, list(initializers[name].dims), name, "quantized")
            added.append(helper.make_node(
                "DequantizeLinear", [name + "_quantized", scale, zero_point], [name + "_DequantizeLinear_Output"],
                name + "_DequantizeLinear", axis=marked.axis))
            emitted.names[name] = (scale, zero_point)
        elif name not in produced_by_dq:
            zero, value = activation_params[name]
            graph.initializer.append(helper.make_tensor(zero_point, _onnx_type(zero), zero.shape, zero.ravel().tolist()))
            graph.initializer.append(helper.make_tensor(scale, TensorProto.FLOAT, value.shape, value.ravel().tolist()))
            activation_pair(name, scale, zero_point)
    pending = {name: marked for name, marked in plan.tensors.items() if marked.provider is not None}
    while pending:
        ready = [name for name, marked in pending.items() if marked.provider in emitted.names]
        if not ready:
            raise ValueError(f"no quantized input to share scale and zero point with: {', '.join(pending)}")
        for name in ready:
            provider = pending.pop(name).provider
            assert provider is not None
            activation_pair(name, *emitted.names[provider])
    for name, bias in plan.biases.items():
        if bias.input not in emitted.names or bias.weight not in emitted.names:
            raise ValueError(f"unable to get valid quantization scales for the inputs of bias {name!r}")
        channels = _bias_channels(plan, bias, initializers)
        quantized = name + "_quantized"
        placeholder(quantized, TensorProto.INT32, list(initializers[name].dims), name, "bias_quantized")
        placeholder(quantized + "_scale", TensorProto.FLOAT, channels or [1], name, "bias_scale")
        placeholder(quantized + "_zero_point", TensorProto.INT32, channels, name, "bias_zero_point")
        graph.initializer.remove(initializers[name])
        added.append(helper.make_node(
            "DequantizeLinear", [quantized, quantized + "_scale", quantized + "_zero_point"], [name],
            name + "_DequantizeLinear", axis=0 if channels else None))
    graph.node.extend(added)
    _drop_unused_initializers(graph)
    del graph.value_info[:]
    ONNXModel(model).topological_sort()
    model.producer_name, model.producer_version = __producer__, __version__
    return emitted


def _bias_channels(plan: QdqPlan, bias: Bias, initializers: Mapping[str, Any]) -> list[int]:
    """``[channels]`` where the bias scale (input scale x weight scale) has more than one
    value, as ONNX Runtime gives it an axis; else ``[]``."""
    marked = plan.tensors.get(bias.weight)
    if marked is None or marked.axis is None:
        return []
    channels = initializers[bias.weight].dims[marked.axis]
    return [channels] if channels > 1 else []


def _channels(tensor: Any, axis: int | None) -> list[int]:
    return [] if axis is None else [tensor.dims[axis]]


def _onnx_type(array: Any) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(array.dtype)


def _drop_unused_initializers(graph: Any) -> None:
    """ONNX Runtime's ``clean_initializers``: initializers nothing reads go (graph inputs of the same name too)."""
    from onnx import AttributeProto

    def used(nodes: Any) -> set[str]:
        names: set[str] = set()
        for node in nodes:
            names.update(node.input)
            for attribute in node.attribute:
                inner = [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
                for subgraph in inner:
                    names |= used(subgraph.node)
        return names

    wanted = used(graph.node) | {output.name for output in graph.output}
    dropped = {tensor.name for tensor in graph.initializer if tensor.name not in wanted}
    kept = [tensor for tensor in graph.initializer if tensor.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [value for value in graph.input if value.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
