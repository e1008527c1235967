"""Low-rank factorization by truncated SVD: the request, the ranks, the factors and the
report, shared by the onnx backend's graph edit (MatMul/Gemm weights) and the torch
backend's; and factorization of ``nn.Linear`` layers on modules.

``y = x @ W`` with ``W`` (n x m) becomes ``y = (x @ A) @ B`` with ``A`` (n x r) and
``B`` (r x m): ``W ~ U_r diag(s_r) V_r^T``, the singular values split evenly
(``A = U_r sqrt(s_r)``, ``B = sqrt(s_r) V_r^T``) so both factors have similar ranges
for a later int8 quantization. A layer is left alone, and listed, when the rank is
not below the matrix's, or when ``r * (n + m) >= n * m`` (no parameters saved).
An ``nn.Linear`` becomes two Linear layers holding the factors, the second with the bias.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from compressor.plugin import UsageError


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


def plan_lowrank(module: Any, request: LowRankRequest) -> tuple[LowRankResult, dict[tuple[str, bool], int]]:
    """The lowrank result (factorized and skipped layers) of ``module``'s nn.Linear layers,
    and the rank of each weight to factorize, keyed as :func:`factorize_linears` takes them."""
    import torch

    uses: dict[int, int] = {}
    for _, parameter in module.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    result, ranks = LowRankResult(), {}
    for name, layer in module.named_modules():
        if type(layer) is not torch.nn.Linear or not matches(request.patterns, name, f"{name}.weight"):
            continue
        weight = layer.weight
        n, m = layer.in_features, layer.out_features
        rank, skip = 0, None
        if not weight.is_floating_point():
            skip = "weight is not floating point"
        elif uses[id(weight)] != 1:
            skip = "weight is shared with another layer"
        else:
            rank, skip = plan_rank(request, n, m, lambda weight=weight: weight.detach().float().numpy().T)
        if skip is not None:
            result.skipped.append({"layer": name, "shape": [n, m], "reason": skip})
            continue
        result.factorized.append({"layer": name, "shape": [n, m], "rank": rank})
        result.ranks[f"{name}.weight"] = rank
        result.params_before += n * m
        result.params_after += rank * (n + m)
        ranks[(f"{name}.weight", False)] = rank
    return result, ranks


def linear_owner(module: Any, parameter: str) -> tuple[Any, str] | None:
    """The nn.Linear whose weight ``parameter`` is, and its name (not the root module)."""
    import torch

    owner_name, _, attribute = parameter.rpartition(".")
    if not owner_name or attribute != "weight":
        return None
    owner = module.get_submodule(owner_name)
    return (owner, owner_name) if isinstance(owner, torch.nn.Linear) else None


def factorize_linears(module: Any, ranks: dict[tuple[str, bool], int]) -> list[str]:
    """Replace each located weight's nn.Linear by two Linear layers of its rank: their names."""
    import torch

    replaced = []
    for (name, _), rank in ranks.items():
        found = linear_owner(module, name)
        assert found is not None
        owner, owner_name = found
        first, second = factors(owner.weight.detach().cpu().numpy().T, rank)
        down = torch.nn.Linear(owner.in_features, rank, bias=False)
        up = torch.nn.Linear(rank, owner.out_features, bias=owner.bias is not None)
        with torch.no_grad():
            down.weight.copy_(torch.from_numpy(first.T.copy()))
            up.weight.copy_(torch.from_numpy(second.T.copy()))
            if owner.bias is not None:
                up.bias.copy_(owner.bias)
        parent_name, _, child = owner_name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, torch.nn.Sequential(down, up).to(owner.weight.dtype))
        replaced.append(owner_name)
    return replaced
