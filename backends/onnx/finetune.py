"""Fine-tuning of the torch model after the graph edits ``prune`` (unstructured,
``structure=channel``) and ``lowrank``, when ``--train-data`` is given.

The edits are made on the exported graph as in one-shot mode, and decide what goes.
The torch model is then brought to the edited graph's function:

* pruning: every weight the edit zeroed or sliced is found in the torch model by
  value (:func:`compressor_frontends.pytorch.finetune.locate_parameters`) and masked;
  the masks are applied again after every optimizer step. A removed channel's inputs
  of the next layer are masked too, so the masked model computes exactly what the
  pruned graph computes;
* lowrank: each factorized weight's ``nn.Linear`` becomes two Linear layers holding
  the same truncated-SVD factors.

It is trained on the train data against the unedited model
(:func:`compressor_frontends.pytorch.finetune.train_student`), exported again, and the
edit made again: the masked weights are zeros, the smallest there are, so the same
weights and channels go. Head pruning is a torch step already (``torch_steps.py``):
its pruned module is trained the same way.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

from compressor.plugin import Context, Model, Step
from compressor_onnx.network import Network

#: The edit made again on the fine-tuned model's export.
Redo = Callable[[Network], Network]


def finetune_graph_edit(model: Model, original: Network, edited: Network, result: Any, step: Step,
                        context: Context, redo: Redo) -> tuple[Network, list[str], dict[str, Any]]:
    """``edited`` (the edit of ``original``, the export of ``model``) made again on a
    fine-tuned torch model; or ``edited`` and a note saying why it was not fine-tuned."""
    if not model.handle.is_torch:
        if model.handle.export is not None:  # a torch model, which an earlier step of this variant exported
            return edited, [f"'{step}' not fine-tuned: an earlier step of this variant made the torch model an "
                            "ONNX graph already, and fine-tuning trains the torch model, so a variant fine-tunes "
                            "its first graph edit only (this one is one-shot)"], {}
        return edited, [f"not fine-tuned: {model.source.name} is read as an ONNX graph, not a torch model "
                        "(one-shot)"], {}
    if original.graph is None or edited.graph is None:
        return edited, ["not fine-tuned: the model is past the large-model threshold (one-shot)"], {}
    import torch

    from compressor_frontends.pytorch.finetune import (
        folded_batch_norms,
        locate_parameters,
        parameter_masks,
        train_student,
    )
    from compressor_frontends.pytorch.lowrank import factorize_linears, linear_owner
    from compressor_onnx.export import exported
    from compressor_onnx.torch_steps import torch_model, torch_of, with_module

    network, teacher, _ = torch_model(model, step, context)
    torch_description = torch_of(network)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecations, copying a .pt2's module
        student = copy.deepcopy(teacher)
    changes = _graph_changes(original.graph, edited.graph, result, step)
    arrays = {name: array for name, (array, _) in changes.items()}
    located = locate_parameters(student, arrays)
    missing = [name for name in changes if name not in located]
    folded = 0
    if missing:
        # The exporter folds each BatchNorm into the Conv before it: fold them here too.
        student, folded = folded_batch_norms(torch_description, student, context)
        if folded:
            located.update(locate_parameters(student, {name: arrays[name] for name in missing}, close=True))
            missing = [name for name in changes if name not in located]
    if missing:
        return edited, [f"not fine-tuned: weight(s) {', '.join(missing[:3])} of the exported graph are not "
                        "parameters of the torch model (folded at export, e.g. a BatchNorm into its Conv): "
                        "one-shot"], {}
    if step.technique == "lowrank":
        outside = [name for name, (parameter, _) in located.items() if linear_owner(student, parameter) is None]
        if outside:
            return edited, [f"not fine-tuned: weight(s) {', '.join(outside[:3])} of the exported graph are not "
                            "the weight of an nn.Linear layer in the torch model: one-shot"], {}
        factorized = factorize_linears(student, {located[name]: int(rank) for name, (_, rank) in changes.items()})
        after_step, facts = None, {"factorized_linear_layers": factorized}
    else:
        masks = parameter_masks(student, {located[name]: mask for name, (_, mask) in changes.items()})

        def after_step() -> None:
            with torch.no_grad():
                for parameter, mask in masks:
                    parameter.mul_(mask)

        after_step()
        facts = {"masked_parameters": len(masks)}
    notes, metadata = train_student(torch_description, teacher, student, step, context, after_step)
    metadata["fine_tuning"].update(facts, batch_norms_folded=folded)
    tuned = exported(with_module(network, student), context)
    return (tuned if step.technique == "lowrank" else redo(tuned)), notes, metadata


def _graph_changes(original: Any, edited: Any, result: Any, step: Step) -> dict[str, tuple[Any, Any]]:
    """Weight initializer name -> (its array in ``original``, what the edit did): a keep
    mask in the graph's layout (pruning) or the rank (lowrank)."""
    import numpy as np
    from onnx import numpy_helper

    before = {tensor.name: tensor for tensor in original.graph.initializer}
    if step.technique == "lowrank":
        return {name: (numpy_helper.to_array(before[name]), rank) for name, rank in result.ranks.items()}
    if step.params.get("structure") == "channel":
        changes = {}
        for name, axes in result.kept.items():
            array = numpy_helper.to_array(before[name])
            keep = np.ones(array.shape, dtype=bool)
            for axis, kept in axes.items():
                along = np.zeros(array.shape[axis], dtype=bool)
                along[kept] = True
                keep &= along.reshape([-1 if index == axis else 1 for index in range(array.ndim)])
            changes[name] = (array, keep)
        return changes
    from compressor_onnx.pruning import prunable_weights

    after = {tensor.name: tensor for tensor in edited.graph.initializer}
    return {name: (numpy_helper.to_array(before[name]), numpy_helper.to_array(after[name]) != 0)
            for name in prunable_weights(original, float(step.params["sparsity"]))}
