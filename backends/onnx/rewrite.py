"""Structural rewrites of an ONNX graph's weights: ``lowrank`` and ``prune structure=channel``.

An edit looks at a graph (in memory, or a skeleton whose weights stay in external
data), changes its nodes and initializer protos, and returns *producers*: for
each new or changed initializer, a function computing its contents. In memory
they run at once; past the large-model threshold the writer calls them one
tensor at a time while it writes the new model (``external.write_model``), so
peak memory stays about one weight and its replacement. The graph's index, node labels
and attributes are :mod:`compressor_frontends.pytorch.onnx_graph`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from compressor.plugin import Context
from compressor_onnx.external import Producer, read_array
from compressor_onnx.network import Network

#: ``edit(model, folder)`` -> (producers of new contents by initializer name, facts).
Edit = Callable[[Any, Path], tuple[dict[str, Producer], Any]]

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
