"""Low-rank factorization of a graph's constant MatMul/Gemm weights (truncated SVD).

``y = x @ W`` with ``W`` (n x m) becomes ``y = (x @ A) @ B`` with ``A`` (n x r) and
``B`` (r x m): ``W ~ U_r diag(s_r) V_r^T``, the singular values split evenly
(``A = U_r sqrt(s_r)``, ``B = sqrt(s_r) V_r^T``) so both factors have similar ranges
for a later int8 quantization. A Gemm keeps its bias, alpha and beta on the second
factor (a Gemm with ``transB=0``); its ``transB`` weight is transposed first.
A layer is left alone, and listed, when the rank is not below the matrix's, or
when ``r * (n + m) >= n * m`` (no parameters saved).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor import CompressionError, UsageError
from compressor_onnx.external import Producer
from compressor_onnx.rewrite import (
    GraphIndex,
    all_names,
    attribute,
    capture,
    label,
    placeholder,
    unique_name,
)


@dataclass(frozen=True)
class LowRankRequest:
    rank: int | None
    energy: float | None
    patterns: tuple[str, ...]
    min_size: int

    def describe(self) -> str:
        return f"rank={self.rank}" if self.rank is not None else f"energy={self.energy:g}"


def lowrank_request(params: Mapping[str, Any]) -> LowRankRequest:
    """The step's parameters; exactly one of ``rank`` and ``energy`` must be given."""
    rank, energy = params.get("rank"), params.get("energy")
    if (rank is None) == (energy is None):
        raise UsageError("lowrank needs exactly one of rank=R (an integer) or energy=E (0.01 to 1)")
    patterns = tuple(p.strip() for p in str(params.get("layers") or "").split(",") if p.strip())
    return LowRankRequest(None if rank is None else int(rank), None if energy is None else float(energy),
                          patterns, int(params.get("min_size") or 0))


def matches(patterns: tuple[str, ...], *names: str) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns for name in names if name)


def rank_for_energy(singular: Any, energy: float) -> int:
    """The smallest rank whose squared singular values reach ``energy`` of their sum."""
    import numpy as np

    squares = np.asarray(singular, dtype=np.float64) ** 2
    cumulative = np.cumsum(squares) / max(float(squares.sum()), 1e-300)
    return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(squares)))


def factors(weights: Any, rank: int) -> tuple[Any, Any]:
    """``A`` (n x rank) and ``B`` (rank x m) with ``A @ B`` the best rank-``rank`` approximation."""
    import numpy as np

    u, s, vt = np.linalg.svd(weights.astype(np.float32), full_matrices=False)
    root = np.sqrt(s[:rank])
    first = np.ascontiguousarray(u[:, :rank] * root).astype(weights.dtype)
    second = np.ascontiguousarray(root[:, None] * vt[:rank]).astype(weights.dtype)
    return first, second


@dataclass
class LowRankResult:
    #: {"layer", "shape": [n, m], "rank", "energy"} per factorized layer.
    factorized: list[dict[str, Any]] = field(default_factory=list)
    #: {"layer", "shape", "reason"} per matching layer left alone.
    skipped: list[dict[str, Any]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    #: Weight initializer name -> rank, for fine-tuning.
    ranks: dict[str, int] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"factorized": self.factorized, "skipped": self.skipped,
                "parameters_before": self.params_before, "parameters_after": self.params_after}

    def note(self, request: LowRankRequest) -> str:
        ranks = sorted(entry["rank"] for entry in self.factorized)
        text = (f"lowrank {request.describe()}: {len(self.factorized)} weight(s) factorized "
                f"(rank {ranks[0]}-{ranks[-1]}), their parameters {self.params_before:,} -> {self.params_after:,}")
        if self.skipped:
            text += f"; {len(self.skipped)} left alone (see metadata lowrank.skipped)"
        return text


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
    from compressor_onnx.rewrite import FLOAT_TYPES

    if tensor.data_type not in FLOAT_TYPES:
        return "weight is not floating point"
    if len(index.consumers[tensor.name]) != 1:
        return "weight is shared with another node"
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return "Gemm with transA"
    return None


def plan_rank(request: LowRankRequest, n: int, m: int, weights: Callable[[], Any]) -> tuple[int, str | None]:
    """The rank of an n x m weight (``weights()`` reads it, for energy=) and None, or why
    the layer is left alone: too small, rank not below the matrix's, no parameters saved.
    Shared by the onnx graph edit and the torch backend's nn.Linear factorization."""
    if n * m < request.min_size:
        return 0, f"{n * m} weights, under min_size={request.min_size}"
    if request.rank is not None and request.rank >= min(n, m):
        return 0, f"rank {request.rank} is not below the matrix's ({min(n, m)})"
    if request.rank is not None:
        rank = request.rank
    else:
        import numpy as np

        singular = np.linalg.svd(np.asarray(weights()).astype(np.float32), compute_uv=False)
        rank = rank_for_energy(singular, float(request.energy or 1.0))
    return rank, _no_saving(rank, n, m)


def _no_saving(rank: int, n: int, m: int) -> str | None:
    if rank * (n + m) >= n * m:
        return f"rank {rank} saves no parameters (r*(n+m) = {rank * (n + m)} >= n*m = {n * m})"
    return None


def nothing_done(request: LowRankRequest, result: LowRankResult,
                 layers: str = "MatMul/Gemm with a constant 2-D weight") -> str:
    if not result.skipped:
        where = f" matching layers={','.join(request.patterns)}" if request.patterns else ""
        return f"lowrank found no {layers}{where}"
    reasons = sorted({entry["reason"].split(" (")[0].split(",")[0] for entry in result.skipped})
    return (f"lowrank {request.describe()} factorized none of {len(result.skipped)} layer(s): "
            f"{'; '.join(reasons[:3])}")


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
