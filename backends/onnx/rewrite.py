"""Structural rewrites of an ONNX graph's weights: ``lowrank`` and ``prune structure=channel``.

An edit looks at a graph (in memory, or a skeleton whose weights stay in external
data), changes its nodes and initializer protos, and returns *producers*: for
each new or changed initializer, a function computing its contents. In memory
they run at once; past the large-model threshold the writer calls them one
tensor at a time while it writes the new model (``external.write_model``), so
peak memory stays about one weight and its replacement.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from compressor import Context, Step
from compressor_onnx.external import Producer, read_array
from compressor_onnx.loading import Network

#: ``edit(model, folder)`` -> (producers of new contents by initializer name, facts).
Edit = Callable[[Any, Path], tuple[dict[str, Producer], Any]]

#: Float element types whose weights are rewritten: FLOAT, FLOAT16, DOUBLE.
FLOAT_TYPES = (1, 10, 11)


def apply_step(network: Network, step: Step, context: Context) -> tuple[Network, list[str], dict[str, Any], Any]:
    """Run ``lowrank`` or ``prune structure=channel`` on an exported network: the new
    network, the notes and the metadata for the report, and the edit's result."""
    if step.technique == "lowrank":
        from compressor_onnx.lowrank import lowrank_edit, lowrank_request

        request = lowrank_request(step.params)
        network, result = rewrite_network(network, lambda model, folder: lowrank_edit(model, folder, request),
                                          context, "lowrank")
        return network, [result.note(request)], {"lowrank": result.to_json()}, result
    from compressor_onnx.channels import channel_edit

    ratio = float(step.params["sparsity"])
    network, result = rewrite_network(network, lambda model, folder: channel_edit(model, folder, ratio),
                                      context, "channels")
    return network, [result.note(ratio)], {"channel_pruning": result.to_json()}, result


def rewrite_network(network: Network, edit: Edit, context: Context, stem: str) -> tuple[Network, Any]:
    """Apply ``edit`` to a copy of the network's graph, or to its file's skeleton
    (written tensor by tensor into the scratch folder): the new network and the facts."""
    import onnx

    if network.path is not None:
        from compressor_onnx.external import load_skeleton, write_model
        from compressor_onnx.large import scratch_model

        skeleton = load_skeleton(network.path)
        producers, facts = edit(skeleton, network.path.parent)
        target = scratch_model(context, stem)
        write_model(skeleton, target, network.path.parent, producers, context.progress)
        return dataclasses.replace(network, path=target), facts
    graph = onnx.ModelProto()
    graph.CopyFrom(network.graph)
    producers, facts = edit(graph, Path("."))
    materialize(graph, producers)
    return dataclasses.replace(network, graph=graph), facts


def materialize(model: Any, producers: Mapping[str, Producer]) -> None:
    """Fill the initializers named in ``producers`` in place, in the graph's order (a
    producer may rely on one listed before it having run)."""
    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        if tensor.name in producers:
            tensor.CopyFrom(numpy_helper.from_array(producers[tensor.name](), tensor.name))


def capture(tensor: Any, folder: Path) -> Producer:
    """A function reading ``tensor``'s current contents later, even once the proto is edited."""
    reference = type(tensor)()
    reference.CopyFrom(tensor)
    return lambda: read_array(reference, folder)


def placeholder(name: str, data_type: int) -> Any:
    """An initializer proto whose contents a producer supplies."""
    from onnx import TensorProto

    tensor = TensorProto()
    tensor.name, tensor.data_type = name, data_type
    return tensor


@dataclasses.dataclass
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


def unique_name(taken: set[str], base: str) -> str:
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    taken.add(name)
    return name


def all_names(model: Any) -> set[str]:
    """Every tensor and node name of the main graph, for making new unique ones."""
    graph = model.graph
    names = {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names
