"""Attention-head pruning of transformers models (``prune structure=head``).

Heads of BERT-style attention (``query``/``key``/``value`` plus the
``output.dense`` projection, as in BERT, RoBERTa, XLM-R, ELECTRA, MiniLM; or
DistilBERT's ``q_lin``/``k_lin``/``v_lin``/``out_lin``) are scored on the data;
the lowest-scoring share of all heads is removed (at least one head stays in each
layer) by slicing the rows of Q, K and V and the matching input columns of the
output projection, so the exported MatMuls really shrink. Transformers 5 dropped
``prune_heads`` and the ``head_mask`` argument, so a gate per head is inserted in
front of each output projection to score heads:

* models with ``logits``: Michel et al. (2019), the mean of |dL/d gate| over the
  data, L the cross-entropy against the labels ``y`` when the data has them,
  else against the model's own predictions; normalised per layer (L2) as in the paper;
* encoders (``last_hidden_state``): ablation, the mean drop in cosine similarity
  of the mean-pooled output when that one head is masked (a gradient at the
  unmasked model of any distance to its own output is zero).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import Context, Dataset, Step, UsageError
from compressor_frontends.pytorch.feeding import batches, call, data_for
from compressor_frontends.pytorch.model import TorchModel, set_mode
from compressor_frontends.pytorch.techniques import require_transformers

#: Examples scored for head importance, at most: by gradient (one pass), by ablation (a pass per head).
SCORED_EXAMPLES, ABLATED_EXAMPLES = 64, 32
SCORE_BATCH = 16
#: (query, key, value, output projection) attribute names; None: the parent's ``output.dense``.
ATTENTION_LAYOUTS = (("query", "key", "value", None), ("q_lin", "k_lin", "v_lin", "out_lin"))
HEAD_COUNTS = ("num_attention_heads", "n_heads", "num_heads")


@dataclass
class Attention:
    name: str
    owner: Any
    query: str
    key: str
    value: str
    #: The module holding the output projection, and its attribute name.
    out_owner: Any
    out: str
    head_size: int

    @property
    def heads(self) -> int:
        return getattr(self.owner, self.query).out_features // self.head_size


def find_attention(module: Any) -> list[Attention]:
    """The self-attention blocks of ``module`` whose heads can be sliced, in order."""
    import torch

    modules = dict(module.named_modules())
    found = []
    for name, owner in modules.items():
        for query, key, value, out in ATTENTION_LAYOUTS:
            layers = [getattr(owner, attr, None) for attr in (query, key, value)]
            if not all(isinstance(layer, torch.nn.Linear) for layer in layers):
                continue
            size = getattr(owner, "attention_head_size", None) or getattr(owner, "head_dim", None)
            widths = {layer.out_features for layer in layers}
            if not isinstance(size, int) or len(widths) != 1 or min(widths) % size:
                continue
            width = layers[0].out_features
            if out is None:
                out_owner, out_attr = getattr(modules.get(name.rpartition(".")[0]), "output", None), "dense"
            else:
                out_owner, out_attr = owner, out
            projection = getattr(out_owner, out_attr, None)
            if isinstance(projection, torch.nn.Linear) and projection.in_features == width:
                found.append(Attention(name, owner, query, key, value, out_owner, out_attr, size))
    return found


def prune_heads(model: TorchModel, module: Any, fresh: bool, step: Step, context: Context,
                source: Path) -> tuple[Any, list[str], dict[str, Any]]:
    """``prune R structure=head`` of ``module`` (``model``'s; edited in place when ``fresh``,
    a copy nobody else holds, else copied first): the pruned module (in eval mode), notes
    and metadata. ``source`` names the model in refusals."""
    import torch

    dataset = data_for(context, "calibration", "eval", "train")
    if dataset is None:
        raise UsageError(f"'{step}' ranks heads on data: pass --data or --calibration-data")
    require_transformers(step, module, source)
    blocks = find_attention(module)
    if not blocks:
        raise UsageError(f"'{step}': {type(module).__name__} has no BERT-style attention "
                         "(query/key/value + output.dense, or q_lin/k_lin/v_lin/out_lin) to prune")
    ratio = float(step.params["sparsity"])
    counts = [block.heads for block in blocks]
    removed = int(round(ratio * sum(counts)))
    if removed == 0:
        raise UsageError(f"'{step}' removes no head of {sum(counts)}: raise the ratio")
    if not fresh:
        module = copy.deepcopy(module)
        blocks = find_attention(module)
    set_mode(module, False)
    context.progress("scoring attention heads", None)
    with torch.random.fork_rng():
        torch.manual_seed(context.seed)
        scores, method = head_scores(model, module, blocks, dataset)
    chosen = choose_heads(scores, removed)
    for block, heads in zip(blocks, chosen):
        if heads:
            slice_heads(block, heads)
    after = [block.heads for block in blocks]
    note = (f"head pruning {ratio:g}: {sum(counts) - sum(after)} of {sum(counts)} attention heads removed "
            f"({method} of {dataset.path.name}), "
            f"heads per layer {'/'.join(map(str, after))}")
    metadata = {"head_pruning": {
        "method": method, "heads_before": sum(counts), "heads_after": sum(after),
        "layers": [{"layer": block.name, "heads": count, "removed": heads,
                    "scores": [round(float(s), 6) for s in layer_scores]}
                   for block, count, heads, layer_scores in zip(blocks, counts, chosen, scores)],
    }}
    return module, [note], metadata


def head_scores(model: TorchModel, module: Any, blocks: list[Attention], dataset: Dataset) -> tuple[list[Any], str]:
    """Per block, the importance of each head (higher: keep), and how it was measured."""
    import torch

    gates = [torch.ones(block.heads, requires_grad=True) for block in blocks]
    hooks = [getattr(block.out_owner, block.out).register_forward_pre_hook(_gate(gate, block.head_size))
             for block, gate in zip(blocks, gates)]
    try:
        name, _ = call(model, module, next(batches(model, dataset, 1))[0])
        if name == "logits":
            examples = list(range(min(dataset.size, SCORED_EXAMPLES)))
            return _gradient_scores(model, module, gates, dataset, examples), (
                "Michel et al. gradient |dL/d head gate|, L: cross-entropy on "
                + ("the labels" if dataset.labels is not None else "the model's own predictions")
                + f", {len(examples)} examples")
        examples = list(range(min(dataset.size, ABLATED_EXAMPLES)))
        return _ablation_scores(model, module, gates, dataset, examples), (
            f"ablation: mean-pooled output cosine drop with the head masked, {len(examples)} examples")
    finally:
        for hook in hooks:
            hook.remove()


def _gate(gate: Any, size: int) -> Any:
    def hook(_: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return (inputs[0] * gate.repeat_interleave(size), *inputs[1:])

    return hook


def _gradient_scores(model: TorchModel, module: Any, gates: list[Any], dataset: Dataset,
                     examples: list[int]) -> list[Any]:
    import torch

    totals = [torch.zeros_like(gate) for gate in gates]
    for batch, labels in batches(model, dataset, SCORE_BATCH, examples):
        _, logits = call(model, module, batch)
        flat = logits.reshape(-1, logits.shape[-1])
        targets = labels if labels is not None and len(labels) == len(flat) else flat.argmax(dim=-1).detach()
        loss = torch.nn.functional.cross_entropy(flat, targets)
        grads = torch.autograd.grad(loss, gates)
        for total, grad in zip(totals, grads):
            total += grad.abs() * len(batch)
    # Michel et al.: scores normalised per layer, so layers compare.
    return [(total / total.norm().clamp_min(1e-12)).detach().numpy() for total in totals]


def _ablation_scores(model: TorchModel, module: Any, gates: list[Any], dataset: Dataset,
                     examples: list[int]) -> list[Any]:
    import numpy as np
    import torch

    scores = [np.zeros(len(gate)) for gate in gates]
    with torch.no_grad():
        for batch, _ in batches(model, dataset, SCORE_BATCH, examples):
            reference = _pooled(batch, call(model, module, batch)[1])
            for layer, gate in enumerate(gates):
                for head in range(len(gate)):
                    gate[head] = 0.0
                    pooled = _pooled(batch, call(model, module, batch)[1])
                    gate[head] = 1.0
                    drop = 1 - torch.nn.functional.cosine_similarity(pooled, reference, dim=-1)
                    scores[layer][head] += float(drop.sum())
    return [layer / len(examples) for layer in scores]


def _pooled(batch: dict[str, Any], hidden: Any) -> Any:
    """Mean over the sequence, of the unmasked tokens when the batch has a mask."""
    mask = batch.get("attention_mask")
    if hidden.ndim != 3:
        return hidden.reshape(hidden.shape[0], -1)
    if mask is None or mask.shape != hidden.shape[:2]:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


def choose_heads(scores: list[Any], removed: int) -> list[list[int]]:
    """Per layer, the heads to remove: the ``removed`` lowest scores overall, keeping
    at least one head in every layer."""
    ranked = sorted((float(score), layer, head) for layer, values in enumerate(scores)
                    for head, score in enumerate(values))
    left = [len(values) for values in scores]
    chosen: list[list[int]] = [[] for _ in scores]
    for _, layer, head in ranked:
        if removed == 0:
            break
        if left[layer] > 1:
            chosen[layer].append(head)
            left[layer] -= 1
            removed -= 1
    return [sorted(heads) for heads in chosen]


def slice_heads(block: Attention, heads: list[int]) -> None:
    """Remove ``heads`` from Q, K, V (output rows) and the output projection (input columns)."""
    import torch

    size, total = block.head_size, block.heads
    kept = torch.tensor([h * size + i for h in range(total) if h not in heads for i in range(size)])
    for attr in (block.query, block.key, block.value):
        setattr(block.owner, attr, _linear(getattr(block.owner, attr), kept, rows=True))
    setattr(block.out_owner, block.out, _linear(getattr(block.out_owner, block.out), kept, rows=False))
    remaining = total - len(heads)
    for attr in HEAD_COUNTS:
        if isinstance(getattr(block.owner, attr, None), int):
            setattr(block.owner, attr, remaining)
    if isinstance(getattr(block.owner, "all_head_size", None), int):
        block.owner.all_head_size = remaining * size


def _linear(layer: Any, kept: Any, rows: bool) -> Any:
    """A copy of the Linear ``layer`` with only the ``kept`` outputs (rows) or inputs."""
    import torch

    weight = layer.weight.detach()
    weight = weight[kept] if rows else weight[:, kept]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None,
                          dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach()[kept] if rows else layer.bias.detach())
    return new
