"""Channel pruning decided on an ONNX graph: which whole output neurons (MatMul/Gemm) or
filters (Conv) go. The onnx backend cuts them out of the graph (``compressor_onnx.channels``);
the torch backend out of the modules whose weights they are, found in the model's own
export (``compressor_torch.structured``).

A chain is a layer with a constant weight (MatMul or Gemm, optionally followed by
an Add of a constant bias; or a Conv), elementwise nodes on its output (Relu,
Gelu, Sigmoid, Tanh, an exported ``x * 0.5 * (1 + erf(x / sqrt 2))``..., whose
other inputs are scalars; for Conv also per-channel pooling and a final
``Flatten``), and the next layer (MatMul, Gemm or Conv) reading the result with a
constant weight. The share ``ratio`` of the first layer's outputs with the
lowest L2 norm of incoming weights is removed from its weight and bias, and the
matching inputs from the next layer's weight, so both matrices really shrink.
Chains whose intermediate tensors feed anything else are left alone and listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compressor.plugin import CompressionError
from compressor_frontends.pytorch.onnx_graph import (
    FLOAT_TYPES,
    GraphIndex,
    attribute,
    constants_to_initializers,
    label,
)

#: Elementwise ops that keep a tensor's channels where they are.
ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Mish", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Clip",
    "Identity", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Dropout",
})
#: Ops that work on each channel of an NCHW tensor alone.
PER_CHANNEL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})
LAYERS = ("MatMul", "Gemm", "Conv")


@dataclass
class ChannelResult:
    #: {"layer", "next", "channels", "kept"} per pruned layer.
    pruned: list[dict[str, Any]] = field(default_factory=list)
    #: {"layer", "reason"} per weighted layer whose outputs were not pruned.
    not_pruned: list[dict[str, Any]] = field(default_factory=list)
    #: Weight initializer name -> {axis: indices kept} (biases left out), for fine-tuning.
    kept: dict[str, dict[int, Any]] = field(default_factory=dict, repr=False)
    #: Constant-node weights made initializers before the edit.
    constants_converted: int = 0

    def to_json(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"pruned": self.pruned, "not_pruned": self.not_pruned}
        if self.constants_converted:
            facts["constant_weights_converted"] = self.constants_converted
        return facts

    def note(self, ratio: float) -> str:
        before = sum(entry["channels"] for entry in self.pruned)
        after = sum(entry["kept"] for entry in self.pruned)
        text = (f"channel pruning {ratio:g}: {len(self.pruned)} layer(s) narrowed by L2 norm, "
                f"{before} -> {after} outputs")
        if self.constants_converted:
            text += f" ({self.constants_converted} Constant-node weight(s) became initializers first)"
        if self.not_pruned:
            text += (f"; {len(self.not_pruned)} not pruned: "
                     + "; ".join(f"{e['layer']} ({e['reason']})" for e in self.not_pruned[:3])
                     + ("; ..." if len(self.not_pruned) > 3 else ""))
        return text


@dataclass
class _Chain:
    layer: Any
    bias: tuple[Any, int] | None
    next_layer: Any
    #: Channels per position of the next layer's input row (after a Flatten), else 1.
    spread: int
    width: int


@dataclass(frozen=True)
class ChannelCut:
    """One pruned chain: the outputs ``kept`` of its layer, and the bias they slice."""

    #: The node and input position of the layer's bias (its Gemm/Conv, or the Add after a
    #: MatMul), or None.
    bias: tuple[Any, int] | None
    kept: Any


@dataclass
class ChannelPlan:
    """What :func:`plan_channels` decided, on the graph it indexed."""

    result: ChannelResult
    cuts: list[ChannelCut]
    index: GraphIndex


def plan_channels(model: Any, ratio: float, read: Callable[[Any], Any]) -> ChannelPlan:
    """Which ``ratio`` of the channels of every prunable chain of ``model`` go (``read``
    gives an initializer's array). Weights held by Constant nodes become initializers
    first (in place), as quantize makes them; nothing else of ``model`` changes."""
    import numpy as np

    # Weights in Constant nodes (older exporters) are edited as initializers, as quantize does.
    result = ChannelResult(constants_converted=constants_to_initializers(model))
    index = GraphIndex.of(model)
    cuts = []
    for node in model.graph.node:
        if node.op_type not in LAYERS or index.weight(node) is None:
            continue
        chain = _find_chain(node, index)
        if isinstance(chain, str):
            result.not_pruned.append({"layer": label(node), "reason": chain})
            continue
        removed = int(round(ratio * chain.width))
        if removed == 0 or removed >= chain.width:
            result.not_pruned.append({"layer": label(node), "reason": f"{chain.width} outputs: ratio removes "
                                      f"{'none' if removed == 0 else 'all'}"})
            continue
        weight = index.initializers[node.input[1]]
        axis = output_axis(node)
        norms = _norms(read(weight), axis, result.kept.get(weight.name, {}))
        kept = np.sort(np.argsort(-norms, kind="stable")[: chain.width - removed])
        result.kept.setdefault(weight.name, {})[axis] = kept
        cuts.append(ChannelCut(chain.bias, kept))
        next_weight = index.initializers[chain.next_layer.input[1]]
        rows = kept if chain.spread == 1 else (
            (np.arange(chain.spread)[None, :] + kept[:, None] * chain.spread).reshape(-1))
        result.kept.setdefault(next_weight.name, {})[input_axis(chain.next_layer)] = rows
        result.pruned.append({"layer": label(node), "next": label(chain.next_layer),
                              "channels": chain.width, "kept": int(len(kept))})
    if not result.pruned:
        reasons = "; ".join(f"{e['layer']}: {e['reason']}" for e in result.not_pruned[:3]) or "no weighted layers"
        raise CompressionError(f"no layer can be channel-pruned ({reasons})")
    return ChannelPlan(result, cuts, index)


def output_axis(node: Any) -> int:
    if node.op_type == "Conv":
        return 0
    return 0 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 1


def input_axis(node: Any) -> int:
    if node.op_type == "Conv":
        return 1
    return 1 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 0


def _norms(weights: Any, axis: int, already: dict[int, Any]) -> Any:
    """L2 norm of each output's incoming weights, over the inputs an earlier chain kept."""
    import numpy as np

    for other, kept in already.items():
        weights = np.take(weights, kept, axis=other)
    moved = np.moveaxis(weights.astype(np.float64), axis, 0)
    return np.sqrt((moved.reshape(moved.shape[0], -1) ** 2).sum(axis=1))


def _layer_problem(node: Any, index: GraphIndex) -> str | None:
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return "Gemm with transA"
    if node.op_type == "Conv" and int(attribute(node, "group", 1)) != 1:
        return "grouped convolution"
    if node.op_type == "MatMul" and len(index.initializers[node.input[1]].dims) != 2:
        return "weight is not 2-D"
    return None


def _find_chain(node: Any, index: GraphIndex) -> _Chain | str:
    """The chain starting at ``node``, or why there is none."""
    problem = _layer_problem(node, index)
    if problem:
        return problem
    weight = index.initializers[node.input[1]]
    width = int(weight.dims[output_axis(node)])
    bias: tuple[Any, int] | None = None
    if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
        if float_constant(index, node.input[2]) is None:
            return "bias is not a constant"
        if _size(float_constant(index, node.input[2])) != 1:
            bias = (node, 2)
    start = node.output[0]
    users = index.consumers[start]
    if node.op_type == "MatMul" and len(users) == 1 and users[0][0].op_type == "Add":
        add, position = users[0]
        other = 1 - position
        constant = float_constant(index, add.input[other])
        if constant is not None and constant.dims and constant.dims[-1] == width and _size(constant) == width:
            bias, start = (add, other), add.output[0]
    found = _region(start, node.op_type == "Conv", index)
    if isinstance(found, str):
        return found
    next_layer, flattened = found
    next_weight = index.weight(next_layer)
    if next_weight is None or _layer_problem(next_layer, index):
        return f"the next layer {label(next_layer)} has no constant weight of its own"
    inputs = int(next_weight.dims[input_axis(next_layer)])
    if next_layer.op_type == "Conv" and flattened:
        return "Flatten before a Conv"
    if inputs % width or (inputs != width and not flattened):
        return f"the next layer {label(next_layer)} takes {inputs} inputs, not {width}"
    return _Chain(node, bias, next_layer, inputs // width, width)


def float_constant(index: GraphIndex, name: str) -> Any | None:
    """The float initializer ``name`` is, or an Identity of (possibly read by other nodes
    too), or the unnamed tensor of the ``Constant`` node writing it (an exporter's bias
    beside a MatMul; it is pruned as a copy), else None."""
    producer = index.producers.get(name)
    if producer is not None and producer.op_type == "Identity":
        name = producer.input[0]
    if producer is not None and producer.op_type == "Constant":
        value = next((a.t for a in producer.attribute if a.name == "value" and a.HasField("t")), None)
        if value is None or value.data_type not in FLOAT_TYPES:
            return None
        tensor = type(value)()
        tensor.CopyFrom(value)
        tensor.name = ""
        return tensor
    tensor = index.initializers.get(name)
    return tensor if tensor is not None and tensor.data_type in FLOAT_TYPES else None


def _size(tensor: Any) -> int:
    import math

    return math.prod(tensor.dims)


def _region(start: str, spatial: bool, index: GraphIndex) -> tuple[Any, bool] | str:
    """From ``start``, the elementwise region up to the one next layer reading it:
    (that layer, whether a Flatten came first), or why the outputs cannot be pruned."""
    tensors, nodes, pending = {start}, {}, [start]
    next_layers: list[Any] = []
    flattened = False
    while pending:
        name = pending.pop()
        if name in index.outputs:
            return "its output is a model output" if name == start else f"{name} is a model output"
        users = index.consumers.get(name, [])
        if not users:
            return f"{name} is not used"
        for user, position in users:
            if user.op_type in LAYERS and position == 0 and not next_layers:
                next_layers.append(user)
                continue
            allowed = ELEMENTWISE | (PER_CHANNEL if spatial and not flattened else frozenset())
            if user.op_type == "Flatten" and spatial and not flattened and int(attribute(user, "axis", 1)) == 1:
                flattened = True
            elif user.op_type not in allowed or position < 0:
                return f"{name} feeds {user.op_type} {label(user)}"
            if id(user) not in nodes:
                nodes[id(user)] = user
                tensors.update(user.output)
                pending.extend(output for output in user.output if output)
    if len(next_layers) != 1:
        return "no next MatMul/Gemm/Conv reads its outputs alone"
    scalar: Callable[[str], bool] = index.is_scalar_constant
    for user in nodes.values():
        if any(name and name not in tensors and not scalar(name) for name in user.input):
            return f"{label(user)} ({user.op_type}) mixes in a tensor that is not a scalar"
    for user in nodes.values():
        if any(len(index.consumers.get(name, [])) == 0 and name in index.outputs for name in user.output):
            return f"{label(user)} is a model output"
    return next_layers[0], flattened
