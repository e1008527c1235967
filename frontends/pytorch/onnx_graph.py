"""Reading the ONNX graphs a PyTorch model exports to: who reads and writes each tensor,
node names and attributes, and weights held by ``Constant`` nodes made initializers.

The onnx backend edits graphs with these (quantize, prune, lowrank), and channel
pruning decides on them which outputs go (:mod:`compressor_frontends.pytorch.channels`)
for both the onnx backend's graph and the torch backend's module.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

#: Float element types whose weights are rewritten: FLOAT, FLOAT16, DOUBLE.
FLOAT_TYPES = (1, 10, 11)
#: Ops whose weights quantization turns into integers; the rest never carry weights.
WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Attention", "LSTM", "GRU"})
#: Element types whose Constant tensors are weights (worth quantizing, pruning).
CONSTANT_WEIGHT_TYPES = ("FLOAT", "FLOAT16", "DOUBLE", "BFLOAT16")


@dataclass
class GraphIndex:
    """Who reads and writes each tensor of a graph's main body."""

    initializers: dict[str, Any]
    consumers: dict[str, list[tuple[Any, int]]]
    producers: dict[str, Any]
    outputs: set[str]

    @classmethod
    def of(cls, model: Any) -> GraphIndex:
        graph = model.graph
        consumers: dict[str, list[tuple[Any, int]]] = defaultdict(list)
        producers = {}
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name:
                    consumers[name].append((node, index))
            for name in node.output:
                producers[name] = node
        # Tensors read inside subgraphs (If/Loop bodies) count as read elsewhere.
        for node in graph.node:
            for attribute in node.attribute:
                for body in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    for inner in body.node:
                        for name in inner.input:
                            consumers[name].append((inner, -1))
        return cls({t.name: t for t in graph.initializer}, consumers, producers,
                   {value.name for value in graph.output})

    def weight(self, node: Any, index: int = 1) -> Any | None:
        """The float initializer at ``node``'s input ``index`` that nothing else reads, else None."""
        if len(node.input) <= index or node.input[index] not in self.initializers:
            return None
        tensor = self.initializers[node.input[index]]
        if tensor.data_type not in FLOAT_TYPES or len(self.consumers[tensor.name]) != 1:
            return None
        return tensor

    def is_scalar_constant(self, name: str) -> bool:
        import math

        if name in self.initializers:
            return math.prod(self.initializers[name].dims) == 1
        node = self.producers.get(name)
        if node is None or node.op_type != "Constant":
            return False
        return all(math.prod(a.t.dims) == 1 for a in node.attribute if a.name == "value")


def label(node: Any) -> str:
    """A node's name, or its first output when it has none."""
    return node.name or node.output[0]


def attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for entry in node.attribute:
        if entry.name == name:
            return helper.get_attribute_value(entry)
    return default


def constants_to_initializers(model: Any) -> int:
    """Move the floating-point ``Constant`` node tensors that weighted ops (MatMul,
    Gemm, Conv, Gather...) read into the main graph's initializers (in place); the
    number moved. Other Constants (shape arithmetic, scalars) stay as they are."""
    from onnx import TensorProto

    floating = {getattr(TensorProto, name) for name in CONSTANT_WEIGHT_TYPES}
    graph = model.graph
    taken = {tensor.name for tensor in graph.initializer}
    weights = {name for node in graph.node if node.op_type in WEIGHTED_OPS for name in node.input}
    kept, moved = [], 0
    for node in graph.node:
        tensor = constant_tensor(node)
        if (tensor is None or tensor.data_type not in floating or node.output[0] in taken
                or node.output[0] not in weights):
            kept.append(node)
            continue
        initializer = graph.initializer.add()
        initializer.CopyFrom(tensor)
        initializer.name = node.output[0]
        taken.add(initializer.name)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved


def constant_tensor(node: Any) -> Any | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    attribute = next((a for a in node.attribute if a.name == "value"), None)
    return attribute.t if attribute is not None and attribute.HasField("t") else None
