"""ONNX Runtime's fused attention in a generation-ready export (issue 27).

The TorchScript export of a transformers attention layer (Llama-style: rotary positions,
grouped-query attention; GPT-2's too) is some eighty small nodes per layer: shape arithmetic, the two
halves of the rotation, the cache concatenation, ``repeat_kv``'s expand, the masked
softmax. At batch 1 each decode step runs every one of them, and their overhead is a large
share of a step once the weights are int4. This pass replaces each layer's attention with
what ONNX Runtime GenAI's model builder writes:

* ``RotaryEmbedding`` (com.microsoft) on the query and key projections, fed the graph's own
  ``position_ids`` and cos/sin tables computed from the model's rotary module (none for a
  model with learned absolute positions, GPT-2);
* ``GroupQueryAttention`` (com.microsoft, no rotation inside) taking the projections, the
  past, and the model's own additive attention mask as ``attention_bias`` -- so left padding,
  which positions and the mask express, means what it meant before; every row is declared
  full length (``seqlens_k = total - 1``) and the bias masks the padding.

A layer is rewritten only where the graph has exactly the shape this pass knows; nothing
else changes. The caller proves the pass on a miniature of the model before applying it
(:func:`compressor_onnx.kv_fusion_export.fuse_export`), so a graph this pass misreads is
never kept. Read in :mod:`compressor_onnx.kv_runtime` too: the tables are left
out of the bytes a token streams (one row is read per position).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

#: The op types the fused attention is made of (the tests check the export has them).
FUSED_OPS = ("GroupQueryAttention", "RotaryEmbedding")
COS_TABLE, SIN_TABLE = "compressor.rotary.cos", "compressor.rotary.sin"
#: Graph metadata: layers fused (absent where the pass was not applied).
FUSED_KEY = "compressor.fused_attention"
_MS = "com.microsoft"
#: Nodes a cache's path may pass through before the concatenation (the exporter's identities).
_PASS_THROUGH = ("Identity", "Concat")


@dataclass(frozen=True)
class AttentionShape:
    """What the fused ops need to know of the model's attention."""

    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class _Layer:
    query: str
    key: str
    value: str
    past_key: str
    past_value: str
    bias: str | None
    scale: float
    output: str
    replaced: tuple[Any, ...]


class _Graph:
    """Producers and consumers of a graph's values, and its constant values."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {output: node for node in graph.node for output in node.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.outputs = {value.name for value in graph.output}
        self._numpy = numpy_helper

    def constant(self, name: str) -> Any | None:
        from onnx import helper

        if name in self.initializers:
            tensor = self.initializers[name]
            return None if tensor.data_location == tensor.EXTERNAL else self._numpy.to_array(tensor)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return self._numpy.to_array(helper.get_attribute_value(node.attribute[0]))
        return None

    def source(self, name: str) -> str:
        """``name`` followed back through identities and one-input concatenations."""
        while (node := self.producer.get(name)) is not None and node.op_type in _PASS_THROUGH \
                and len(node.input) == 1:
            name = node.input[0]
        return name

    def descendant(self, name: str, op_type: str, depth: int) -> Any | None:
        """The first ``op_type`` node reached from ``name`` within ``depth`` nodes, or None."""
        frontier = [name]
        for _ in range(depth):
            following = []
            for value in frontier:
                for node in self.consumers.get(value, ()):
                    if node.op_type == op_type:
                        return node
                    following.extend(node.output)
            frontier = following
        return None

    def projection(self, name: str, depth: int) -> str | None:
        """The ``[batch, sequence, heads * head_dim]`` projection a ``[batch, heads, sequence,
        head_dim]`` value was made from: the input of the ``Reshape`` under its head transpose."""
        frontier = [name]
        for _ in range(depth):
            following = []
            for value in frontier:
                node = self.producer.get(value)
                if node is None:
                    continue
                if node.op_type == "Transpose" and _perm(node) == [0, 2, 1, 3]:
                    reshape = self.producer.get(node.input[0])
                    return reshape.input[0] if reshape is not None and reshape.op_type == "Reshape" else None
                following.extend(node.input)
            frontier = following
        return None


def _perm(node: Any) -> list[int] | None:
    from onnx import helper

    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)


def _layer(view: _Graph, layer: int) -> _Layer | None:
    """Layer ``layer``'s attention as this pass knows it, or None where the graph differs."""
    key_concat = view.producer.get(f"present.{layer}.key")
    value_concat = view.producer.get(f"present.{layer}.value")
    if key_concat is None or value_concat is None or key_concat.op_type != "Concat" \
            or value_concat.op_type != "Concat" or len(key_concat.input) != 2 or len(value_concat.input) != 2:
        return None
    past_key, past_value = view.source(key_concat.input[0]), view.source(value_concat.input[0])
    if (past_key, past_value) != (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"):
        return None
    key, value = view.projection(key_concat.input[1], 6), view.projection(value_concat.input[1], 1)
    scores = view.descendant(f"present.{layer}.key", "MatMul", 12)
    weighted = view.descendant(f"present.{layer}.value", "MatMul", 12)
    if key is None or value is None or scores is None or weighted is None:
        return None
    query = view.projection(scores.input[0], 6)
    chain = [node for node in view.consumers.get(scores.output[0], ())]
    if query is None or len(chain) != 1 or chain[0].op_type != "Mul":
        return None
    scaling = chain[0]
    factor = view.constant(scaling.input[1] if scaling.input[0] == scores.output[0] else scaling.input[0])
    if factor is None or factor.size != 1:
        return None
    after = view.consumers.get(scaling.output[0], [])
    bias = None
    if len(after) == 1 and after[0].op_type == "Add":
        bias = next(name for name in after[0].input if name != scaling.output[0])
        after = view.consumers.get(after[0].output[0], [])
    if len(after) != 1 or after[0].op_type != "Softmax" or not _reaches(view, after[0].output[0], weighted, 3):
        return None
    transpose = view.consumers.get(weighted.output[0], [])
    if len(transpose) != 1 or transpose[0].op_type != "Transpose" or _perm(transpose[0]) != [0, 2, 1, 3]:
        return None
    readers = view.consumers.get(transpose[0].output[0], [])
    reshape = [node for node in readers if node.op_type == "Reshape"]
    if len(reshape) != 1 or any(node.op_type not in ("Reshape", "Shape") for node in readers):
        return None  # (GPT-2 reads the shape of what it reshapes: Shape nodes, dead once fused)
    return _Layer(query, key, value, past_key, past_value, bias, float(factor.reshape(())),
                  reshape[0].output[0], (key_concat, value_concat, reshape[0]))


def _reaches(view: _Graph, name: str, target: Any, depth: int) -> bool:
    """Whether ``name`` feeds ``target``'s first input within ``depth`` nodes (casts between)."""
    for _ in range(depth):
        if target.input[0] == name:
            return True
        following = view.consumers.get(name, [])
        if len(following) != 1 or following[0].op_type != "Cast":
            return False
        name = following[0].output[0]
    return target.input[0] == name


def recognizes(model: Any) -> bool:
    """Whether :func:`fuse_attention` would rewrite ``model``'s layers (it changes nothing)."""
    return bool(_recognized(_Graph(model.graph)))


def _recognized(view: _Graph) -> list[_Layer]:
    """Every layer's attention, or [] where the graph is not one this pass rewrites whole."""
    from onnx import AttributeProto

    graph = view.graph
    inputs = {value.name for value in graph.input}
    if not {"input_ids", "attention_mask", "position_ids"} <= inputs:
        return []
    if any(attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
           for node in graph.node for attribute in node.attribute):
        return []  # subgraphs read outer values their node does not list: liveness would be wrong
    count = sum(name.startswith("past_key_values.") and name.endswith(".key") for name in inputs)
    found = [_layer(view, layer) for layer in range(count)]
    return [layer for layer in found if layer is not None] if found and None not in found else []


def fuse_attention(model: Any, shape: AttentionShape, cos_table: Any | None, sin_table: Any | None) -> int:
    """Rewrite every layer of ``model`` (a ModelProto, changed in place) whose attention this
    pass recognizes; returns how many were. All layers or none: a partly fused graph is left
    as it was. Without tables (a model without rotary positions: GPT-2) the projections go
    into GroupQueryAttention unrotated."""
    from onnx import helper, numpy_helper

    graph = model.graph
    view = _Graph(graph)
    found = _recognized(view)
    if not found:
        return 0
    inputs = {value.name for value in graph.input}
    element_type = next(value.type.tensor_type.elem_type for value in graph.input
                        if value.name == "past_key_values.0.key")
    nodes = _shared_inputs()
    replaced = set()
    for index, layer in enumerate(found):
        prefix = f"/compressor/fused/layers.{index}"
        rotated = [layer.query, layer.key]
        for kind, projection, heads in (("query", layer.query, shape.heads), ("key", layer.key, shape.kv_heads)):
            if cos_table is None:
                break
            rotated[kind == "key"] = f"{prefix}/{kind}_rotated"
            nodes.append(helper.make_node(
                "RotaryEmbedding", [projection, "position_ids", COS_TABLE, SIN_TABLE], [rotated[kind == "key"]],
                name=f"{prefix}/{kind}_rotary", domain=_MS, interleaved=0, num_heads=heads,
                rotary_embedding_dim=shape.head_dim))
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [rotated[0], rotated[1], layer.value, layer.past_key, layer.past_value, "/compressor/fused/seqlens_k",
             "/compressor/fused/total_length", "", "", "", layer.bias or ""],
            [f"{prefix}/attention", f"present.{index}.key", f"present.{index}.value"],
            name=f"{prefix}/GroupQueryAttention", domain=_MS, num_heads=shape.heads,
            kv_num_heads=shape.kv_heads, scale=layer.scale, do_rotary=0))
        # A cast to the type it already has (ONNX Runtime drops it at load): ONNX's shape
        # inference knows no com.microsoft op, and ONNX Runtime's quantizers need the type of
        # every MatMul input, the output projection's included.
        nodes.append(helper.make_node("Cast", [f"{prefix}/attention"], [layer.output], name=f"{prefix}/typed",
                                      to=element_type))
        replaced.update(id(node) for node in layer.replaced)
    tables = {COS_TABLE: cos_table, SIN_TABLE: sin_table} if cos_table is not None else {}
    available = inputs | set(view.initializers) | set(tables)
    read = splice(graph, replaced, nodes, available)
    if read is None:
        return 0
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in read]:
        graph.initializer.remove(tensor)
    graph.initializer.extend([numpy_helper.from_array(table, name) for name, table in tables.items()])
    if not any(entry.domain == _MS for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, FUSED_KEY: str(len(found))})
    return len(found)


def _shared_inputs() -> list[Any]:
    """``seqlens_k`` (every row full length: the bias masks padding) and ``total_sequence_length``,
    from the attention mask's width."""
    from onnx import TensorProto, helper

    def node(op: str, inputs: list[str], output: str, **attributes: Any) -> Any:
        return helper.make_node(op, inputs, [f"/compressor/fused/{output}"], name=f"/compressor/fused/{output}",
                                **attributes)

    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    return [
        node("Shape", ["attention_mask"], "total_1d", start=1, end=2),
        node("Shape", ["input_ids"], "batch_1d", start=0, end=1),
        node("Constant", [], "one", value=one),
        node("Sub", ["/compressor/fused/total_1d", "/compressor/fused/one"], "last_1d"),
        node("Expand", ["/compressor/fused/last_1d", "/compressor/fused/batch_1d"], "last_rows"),
        node("Cast", ["/compressor/fused/last_rows"], "seqlens_k", to=TensorProto.INT32),
        node("Squeeze", ["/compressor/fused/total_1d"], "total_scalar"),
        node("Cast", ["/compressor/fused/total_scalar"], "total_length", to=TensorProto.INT32),
    ]


def splice(graph: Any, replaced: set[int], nodes: list[Any], available: set[str]) -> set[str] | None:
    """``graph``'s nodes less those in ``replaced`` (ids) plus ``nodes``, in an order that computes
    each value before it is read and only those that reach an output; the names the kept nodes
    read, or None (the graph unchanged) where no such order exists."""
    try:
        ordered = _ordered([node for node in graph.node if id(node) not in replaced] + nodes, available)
    except ValueError:
        return None
    live = _live(ordered, {value.name for value in graph.output})
    del graph.node[:]
    graph.node.extend(live)
    return {name for node in live for name in node.input}


def _ordered(nodes: list[Any], available: set[str]) -> list[Any]:
    """``nodes`` in an order where each comes after what it reads (Kahn's, stable)."""
    from collections import deque

    producer = {output: index for index, node in enumerate(nodes) for output in node.output if output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = defaultdict(list)
    for index, node in enumerate(nodes):
        for name in set(node.input):
            if name in producer:
                waiting[index] += 1
                readers[producer[name]].append(index)
            elif name and name not in available:
                raise ValueError(f"the fused graph reads {name!r}, which nothing makes")
    ready = deque(index for index, count in enumerate(waiting) if count == 0)
    ordered = []
    while ready:
        index = ready.popleft()
        ordered.append(nodes[index])
        for reader in readers[index]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    if len(ordered) != len(nodes):
        raise ValueError("the fused graph has a cycle")
    return ordered


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """The nodes (in order) that the graph's outputs need."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(name and name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]
