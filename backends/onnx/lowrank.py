"""Low-rank factorization of a graph's constant MatMul/Gemm weights (truncated SVD).

The request, ranks, skip rules, factors and report are the PyTorch front end's
(:mod:`compressor_frontends.pytorch.lowrank`, shared with the torch backend's
``nn.Linear`` factorization). Here ``y = x @ W`` becomes ``y = (x @ A) @ B`` in the
graph: a Gemm keeps its bias, alpha and beta on the second factor (a Gemm with
``transB=0``); its ``transB`` weight is transposed first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError
from compressor_frontends.pytorch.lowrank import (
    LowRankRequest,
    LowRankResult,
    factors,
    matches,
    nothing_done,
    plan_rank,
)
from compressor_frontends.pytorch.onnx_graph import FLOAT_TYPES, GraphIndex, attribute, label
from compressor_onnx.external import Producer
from compressor_onnx.rewrite import all_names, capture, placeholder, unique_name


@dataclass
class _Plan:
    node: Any
    weight: Any
    transposed: bool
    rank: int


def lowrank_edit(model: Any, folder: Path, request: LowRankRequest) -> tuple[dict[str, Producer], LowRankResult]:
    """Factorize the matching weights of ``model`` in place (nodes and initializer protos);
    the producers of the new factors' contents."""
    from compressor_onnx.external import read_array

    index = GraphIndex.of(model)
    result, plans = LowRankResult(), []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in index.initializers:
            continue
        tensor = index.initializers[node.input[1]]
        if not matches(request.patterns, label(node), tensor.name) or len(tensor.dims) != 2:
            continue
        transposed = node.op_type == "Gemm" and bool(attribute(node, "transB", 0))
        n, m = (tensor.dims[1], tensor.dims[0]) if transposed else (tensor.dims[0], tensor.dims[1])
        skip = _reason_to_skip(node, tensor, index)
        rank = 0
        if skip is None:
            rank, skip = plan_rank(request, n, m, lambda tensor=tensor: read_array(tensor, folder))
        if skip is not None:
            result.skipped.append({"layer": label(node), "shape": [n, m], "reason": skip})
            continue
        plans.append(_Plan(node, tensor, transposed, rank))
        result.factorized.append({"layer": label(node), "shape": [n, m], "rank": rank})
        result.ranks[tensor.name] = rank
        result.params_before += n * m
        result.params_after += rank * (n + m)
    if not plans:
        raise CompressionError(nothing_done(request, result))
    return _rewrite(model, plans, folder), result


def _reason_to_skip(node: Any, tensor: Any, index: GraphIndex) -> str | None:
    if tensor.data_type not in FLOAT_TYPES:
        return "weight is not floating point"
    if len(index.consumers[tensor.name]) != 1:
        return "weight is shared with another node"
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return "Gemm with transA"
    return None


def _rewrite(model: Any, plans: list[_Plan], folder: Path) -> dict[str, Producer]:
    from onnx import helper

    graph = model.graph
    taken = all_names(model)
    replaced: dict[int, list[Any]] = {}
    new_tensors: dict[str, list[Any]] = {}
    producers: dict[str, Producer] = {}
    for plan in plans:
        node, name = plan.node, plan.weight.name
        first_name, second_name = unique_name(taken, f"{name}_lowrank_a"), unique_name(taken, f"{name}_lowrank_b")
        middle = unique_name(taken, f"{node.output[0]}_lowrank")
        first = helper.make_node("MatMul", [node.input[0], first_name], [middle],
                                 name=unique_name(taken, f"{label(node)}_lowrank"))
        if node.op_type == "MatMul":
            second = helper.make_node("MatMul", [middle, second_name], list(node.output), name=node.name)
        else:
            second = helper.make_node("Gemm", [middle, second_name, *node.input[2:]], list(node.output),
                                      name=node.name, alpha=float(attribute(node, "alpha", 1.0)),
                                      beta=float(attribute(node, "beta", 1.0)))
        replaced[id(node)] = [first, second]
        new_tensors[name] = [placeholder(first_name, plan.weight.data_type),
                             placeholder(second_name, plan.weight.data_type)]
        producers.update(_producers(plan, folder, first_name, second_name))
    nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    tensors = []
    for tensor in graph.initializer:
        tensors.extend(new_tensors.get(tensor.name, [tensor]))
    del graph.initializer[:]
    graph.initializer.extend(tensors)
    # Shapes recorded for the old weights would contradict the new graph.
    gone = set(new_tensors)
    kept_info = [value for value in graph.value_info if value.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return producers


def _producers(plan: _Plan, folder: Path, first_name: str, second_name: str) -> dict[str, Producer]:
    """Producers of both factors from one SVD: the writer reaches the first, then the second."""
    read = capture(plan.weight, folder)
    pending: dict[str, Any] = {}

    def first() -> Any:
        weights = read()
        first_factor, pending["second"] = factors(weights.T if plan.transposed else weights, plan.rank)
        return first_factor

    def second() -> Any:
        if "second" not in pending:
            first()
        return pending.pop("second")

    return {first_name: first, second_name: second}
