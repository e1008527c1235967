"""Fine-tuning of the torch model after ``prune`` (unstructured, ``structure=channel``,
``structure=head``) and ``lowrank``, when ``--train-data`` is given.

Graph edits (unstructured and channel pruning, lowrank) are made on the exported
graph as in one-shot mode, and decide what goes. The torch model is then brought to
the edited graph's function:

* pruning: every weight the edit zeroed or sliced is found in the torch model by
  value (an exported Linear/Conv weight is the parameter itself, or its transpose
  for a MatMul) and masked; the masks are applied again after every optimizer step.
  A removed channel's inputs of the next layer are masked too, so the masked model
  computes exactly what the pruned graph computes;
* lowrank: each factorized weight's ``nn.Linear`` becomes two Linear layers holding
  the same truncated-SVD factors.

It is trained on the train data against the unedited model with distill's loss
(:mod:`compressor_onnx.matching`: KL on softened logits, plus cross-entropy on the
labels ``y`` through the output they belong to; hidden-state matching for encoders;
other outputs by MSE over their variance), exported again, and the edit made again: the
masked weights are zeros, the smallest there are, so the same weights and channels
go. Head pruning is a torch step already: its pruned module is trained the same way.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

from compressor import Context, Model, Step
from compressor_onnx.heads import set_mode
from compressor_onnx.loading import Network

PLAIN_RATE, TRANSFORMERS_RATE = 1e-3, 5e-5
LOSS_SETTINGS = {"temperature": 2.0, "alpha": 0.5}
#: The edit made again on the fine-tuned model's export.
Redo = Callable[[Network], Network]


def fine_tuning_wanted(step: Step, context: Context) -> bool:
    return context.train_data is not None and int(step.params.get("epochs") or 0) > 0


def one_shot_note(step: Step, context: Context) -> str:
    if context.train_data is None:
        return "one-shot, no fine-tuning (no --train-data)"
    return "one-shot, no fine-tuning (epochs=0)"


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

    from compressor_onnx.export import exported
    from compressor_onnx.heads import torch_model, with_module

    network, teacher, _ = torch_model(model, step, context)
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
        student, folded = folded_batch_norms(network, student, context)
        if folded:
            located.update(locate_parameters(student, {name: arrays[name] for name in missing}, close=True))
            missing = [name for name in changes if name not in located]
    if missing:
        return edited, [f"not fine-tuned: weight(s) {', '.join(missing[:3])} of the exported graph are not "
                        "parameters of the torch model (folded at export, e.g. a BatchNorm into its Conv): "
                        "one-shot"], {}
    if step.technique == "lowrank":
        outside = [name for name, (parameter, _) in located.items() if _linear_owner(student, parameter) is None]
        if outside:
            return edited, [f"not fine-tuned: weight(s) {', '.join(outside[:3])} of the exported graph are not "
                            "the weight of an nn.Linear layer in the torch model: one-shot"], {}
        factorized = factorize_linears(student, {located[name]: int(rank) for name, (_, rank) in changes.items()})
        after_step, facts = None, {"factorized_linear_layers": factorized}
    else:
        masks = _masks(student, {located[name]: mask for name, (_, mask) in changes.items()})

        def after_step() -> None:
            with torch.no_grad():
                for parameter, mask in masks:
                    parameter.mul_(mask)

        after_step()
        facts = {"masked_parameters": len(masks)}
    notes, metadata = train_student(network, teacher, student, step, context, after_step)
    metadata["fine_tuning"].update(facts, batch_norms_folded=folded)
    tuned = exported(with_module(network, student), context)
    return (tuned if step.technique == "lowrank" else redo(tuned)), notes, metadata


def train_student(network: Network, teacher: Any, student: Any, step: Step, context: Context,
                  after_step: Callable[[], None] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Train ``student`` (the edited model) to match ``teacher`` (the unedited one) on the
    train data, in place: the note and metadata."""
    import torch

    from compressor_onnx.distill import train
    from compressor_onnx.heads import is_transformers
    from compressor_onnx.matching import matching

    dataset = context.train_data
    assert dataset is not None
    set_mode(teacher, False)
    plan = matching(network, teacher, student, dataset, context, step)
    rate = float(step.params.get("learning_rate") or (TRANSFORMERS_RATE if is_transformers(teacher) else PLAIN_RATE))
    settings = {"epochs": int(step.params["epochs"]), "batch_size": int(step.params.get("batch_size") or 32),
                **LOSS_SETTINGS}
    started = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(context.seed)
        losses = train(network, teacher, student, dataset, settings, plan, rate, context, after_step,
                       stage="fine-tuning")
    set_mode(student, False)
    loss = plan.describe()
    note = (f"fine-tuned {settings['epochs']} epoch(s) on {dataset.size} examples of {dataset.path.name} "
            f"against the unedited model ({loss}); loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    return [note, plan.labels.note] if plan.labels.note else [note], {"fine_tuning": {
        "epochs": settings["epochs"], "examples": dataset.size, "loss": loss, "label_output": plan.labels.name,
        "learning_rate": rate, "epoch_losses": [round(value, 6) for value in losses],
        "seconds": round(time.perf_counter() - started, 3),
    }}


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


def _key(array: Any) -> tuple[tuple[int, ...], str, bytes]:
    import hashlib

    import numpy as np

    contiguous = np.ascontiguousarray(array)
    return tuple(contiguous.shape), contiguous.dtype.str, hashlib.blake2b(contiguous.tobytes(), digest_size=16).digest()


def locate_parameters(module: Any, arrays: dict[str, Any], close: bool = False) -> dict[str, tuple[str, bool]]:
    """Initializer name -> (parameter name, whether the initializer is its transpose),
    for the arrays equal (``close``: within float rounding) to exactly one parameter of ``module``."""
    if close:
        return _locate_close(module, arrays)
    found: dict[Any, list[tuple[str, bool]]] = {}
    for name, parameter in module.named_parameters():
        values = parameter.detach().cpu().numpy()
        found.setdefault(_key(values), []).append((name, False))
        if values.ndim == 2:
            found.setdefault(_key(values.T), []).append((name, True))
    located = {}
    for name, array in arrays.items():
        matches = found.get(_key(array), [])
        if len(matches) == 1:
            located[name] = matches[0]
    return located


def _locate_close(module: Any, arrays: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    import numpy as np

    candidates = []
    for name, parameter in module.named_parameters():
        values = parameter.detach().cpu().numpy()
        candidates.append((name, False, values))
        if values.ndim == 2:
            candidates.append((name, True, values.T))
    located = {}
    for name, array in arrays.items():
        scale = float(np.abs(array).max()) if array.size else 0.0
        matches = [(parameter, transposed) for parameter, transposed, values in candidates
                   if values.shape == array.shape and np.allclose(values, array, rtol=1e-4, atol=1e-6 * scale)]
        if len(matches) == 1:
            located[name] = matches[0]
    return located


def folded_batch_norms(network: Network, module: Any, context: Context) -> tuple[Any, int]:
    """``module`` with each BatchNorm registered right after a Conv of the same width
    folded into it, as the ONNX exporter does, and the count; ``module`` as it was (and
    0) when there are none or the folded model does not compute the same outputs (the
    modules were registered in another order than they run)."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from compressor_onnx.heads import batches, call, data_for

    folded_module, folded = set_mode(copy.deepcopy(module), False), 0
    for parent in list(folded_module.modules()):
        children = list(parent.named_children())
        for (name, layer), (norm_name, norm) in zip(children, children[1:]):
            if (isinstance(layer, torch.nn.modules.conv._ConvNd) and not layer.transposed
                    and isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None
                    and norm.num_features == layer.out_channels):
                setattr(parent, name, fuse_conv_bn_eval(layer, norm))
                setattr(parent, norm_name, torch.nn.Identity())
                folded += 1
    dataset = data_for(context, "train", "calibration", "eval")
    if not folded or dataset is None:
        return module, 0
    batch, _ = next(batches(network, dataset, min(8, dataset.size)))
    with torch.no_grad():
        _, expected = call(network, set_mode(module, False), batch)
        _, got = call(network, folded_module, batch)
    scale = float(expected.abs().max()) or 1.0
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * scale):
        return module, 0
    return folded_module, folded


def _masks(module: Any, keeps: dict[tuple[str, bool], Any]) -> list[tuple[Any, Any]]:
    """(parameter, float mask in its layout) for every located keep mask."""
    import numpy as np
    import torch

    parameters = dict(module.named_parameters())
    masks = []
    for (name, transposed), keep in keeps.items():
        parameter = parameters[name]
        layout = np.ascontiguousarray(keep.T if transposed else keep)
        masks.append((parameter, torch.from_numpy(layout).to(parameter.dtype)))
    return masks


def _linear_owner(module: Any, parameter: str) -> tuple[Any, str] | None:
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

    from compressor_onnx.lowrank import factors

    replaced = []
    for (name, _), rank in ranks.items():
        found = _linear_owner(module, name)
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
