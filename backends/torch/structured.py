"""The torch backend's structured techniques, by the PyTorch front end on the model's module.

* ``lowrank``: every matching ``nn.Linear`` replaced by two Linear layers holding
  the truncated-SVD factors of its weight (:mod:`compressor_frontends.pytorch.lowrank`:
  the same request, ranks, skip rules, factors and report as the onnx graph edit);
* ``prune structure=head``: :func:`compressor_frontends.pytorch.heads.prune_heads`;
* ``prune structure=channel``: the chain analysis of
  :mod:`compressor_frontends.pytorch.channels` on the module's ONNX export decides
  which outputs go; its kept indices are mapped back to the Linear/Conv parameters
  (:func:`compressor_frontends.pytorch.finetune.locate_parameters`, by value) and those
  modules really sliced;
* ``distill``: :func:`compressor_frontends.pytorch.distill.distill`;
* unstructured ``prune`` (``quantize.prune``) is fine-tuned with its zeros kept.

With ``--train-data`` and ``epochs`` > 0 the edited module is fine-tuned against
the unedited one (:func:`compressor_frontends.pytorch.finetune.train_student`), else the
note says one-shot. A changed architecture can no longer be rebuilt from the model
factory or the transformers config: such a model is saved as ``.pt2`` only (``recipe`` emptied).
"""

from __future__ import annotations

import copy
from typing import Any

from compressor.plugin import CompressionError, Context, Model, Step, UsageError
from compressor_frontends.pytorch import TorchModel
from compressor_torch.loading import transformers_recipe

#: Steps whose result the safetensors manifest could not rebuild (distill sets its own recipe).
RESHAPING = ("lowrank", "channel", "head")


def kind(step: Step) -> str:
    """``lowrank``, ``distill``, or the prune structure (``unstructured``, ``channel``, ``head``)."""
    if step.technique == "prune":
        return str(step.params.get("structure") or "unstructured")
    return step.technique


def check_step(model: Model, step: Step, context: Context, after_quantize: bool = False) -> None:
    """Refuse, before any work, what this backend cannot do with ``step`` (``after_quantize``:
    a quantize step of the same variant comes before it)."""
    import torch

    net: TorchModel = model.handle
    what = kind(step)
    if (net.quantization or after_quantize) and what != "unstructured":
        raise UsageError(f"'{step}' changes the float model: put it before quantize")
    program = isinstance(net.module, torch.fx.GraphModule)
    if program and what != "unstructured" and (what != "distill" or step.params.get("student") is None):
        raise UsageError(f"'{step}' needs the model's nn.Module layers, which a .pt2 program does not keep; "
                         "load the state_dict with --set model_factory (or use --backend onnx)")
    if what in RESHAPING and str(context.options.get("save_format") or "auto") == "safetensors":
        raise UsageError(f"'{step}' changes the architecture, which the safetensors manifest cannot rebuild "
                         "from the model factory or config: leave save_format=auto (.pt2)")
    if what == "lowrank":
        from compressor_frontends.pytorch.lowrank import lowrank_request

        lowrank_request(step.params)


def apply(model: Model, step: Step, context: Context) -> tuple[TorchModel, list[str], dict[str, Any]]:
    """``step`` on the model's module (its own fork): the model, notes and metadata."""
    check_step(model, step, context)
    what = kind(step)
    if what == "distill":
        return _distill(model, step, context)
    if what == "head":
        return _heads(model, step, context)
    if what == "lowrank":
        return _lowrank(model.handle, step, context)
    if what == "channel":
        return _channels(model.handle, step, context)
    return _unstructured(model.handle, step, context)


def _fine_tuned(net: TorchModel, teacher: Any, student: Any, step: Step, context: Context,
                after_step: Any = None) -> tuple[list[str], dict[str, Any]]:
    """Fine-tuning of ``student`` against ``teacher`` on --train-data, or the one-shot note."""
    from compressor_frontends.pytorch.finetune import (
        fine_tuning_wanted,
        one_shot_note,
        train_student,
    )

    if not fine_tuning_wanted(step, context):
        return [one_shot_note(step, context)], {}
    return train_student(net, teacher, student, step, context, after_step)


def _unstructured(net: TorchModel, step: Step, context: Context) -> tuple[TorchModel, list[str], dict[str, Any]]:
    import torch

    from compressor_frontends.pytorch.finetune import fine_tuning_wanted, one_shot_note
    from compressor_torch.quantize import layer_weights, prune

    sparsity = float(step.params["sparsity"])
    tune = fine_tuning_wanted(step, context) and not isinstance(net.module, torch.fx.GraphModule)
    teacher = copy.deepcopy(net.module) if tune else None
    net, layers = prune(net, sparsity)
    notes = [f"pruned {sparsity:g} of the weights of {layers} layers by magnitude"]
    metadata: dict[str, Any] = {"pruned_layers": layers}
    if teacher is None:
        reason = ("not fine-tuned: a .pt2 program is not trained here (one-shot)" if fine_tuning_wanted(step, context)
                  else one_shot_note(step, context))
        return net, [*notes, reason], metadata
    masks = [(weight, (weight != 0).to(weight.dtype)) for weight in layer_weights(net.module)]

    def keep_zeros() -> None:
        with torch.no_grad():
            for weight, mask in masks:
                weight.mul_(mask)

    more_notes, more_metadata = _fine_tuned(net, teacher, net.module, step, context, keep_zeros)
    more_metadata["fine_tuning"]["masked_parameters"] = len(masks)
    return net, [*notes, *more_notes], {**metadata, **more_metadata}


def _heads(model: Model, step: Step, context: Context) -> tuple[TorchModel, list[str], dict[str, Any]]:
    from compressor_frontends.pytorch.heads import prune_heads

    net: TorchModel = model.handle
    teacher = net.module
    pruned, notes, metadata = prune_heads(net, teacher, False, step, context, model.source)  # edits a copy
    more_notes, more_metadata = _fine_tuned(net, teacher, pruned, step, context)
    net.module, net.recipe = pruned.eval(), {}
    return net, [*notes, *more_notes], {**metadata, **more_metadata}


def _distill(model: Model, step: Step, context: Context) -> tuple[TorchModel, list[str], dict[str, Any]]:
    from compressor_frontends.pytorch.distill import distill
    from compressor_frontends.pytorch.feeding import is_transformers

    net: TorchModel = model.handle
    student, notes, metadata = distill(net, net.module, step, context, model.source)
    student = student.eval()
    factory = step.params.get("student")
    net.module = student
    # The student is rebuilt from its own factory, or the teacher's class with its config.
    net.recipe = ({"factory": str(factory)} if factory is not None
                  else transformers_recipe(student) if is_transformers(student) else {})
    return net, notes, metadata


# --- lowrank ----------------------------------------------------------------------------------------

def _lowrank(net: TorchModel, step: Step, context: Context) -> tuple[TorchModel, list[str], dict[str, Any]]:
    from compressor_frontends.pytorch.finetune import fine_tuning_wanted
    from compressor_frontends.pytorch.lowrank import (
        factorize_linears,
        lowrank_request,
        nothing_done,
        plan_lowrank,
    )

    request = lowrank_request(step.params)
    result, ranks = plan_lowrank(net.module, request)
    if not ranks:
        raise CompressionError(nothing_done(request, result, "nn.Linear layer"))
    teacher = copy.deepcopy(net.module) if fine_tuning_wanted(step, context) else None
    factorized = factorize_linears(net.module, ranks)
    notes = [result.note(request)]
    metadata: dict[str, Any] = {"lowrank": result.to_json()}
    more_notes, more_metadata = _fine_tuned(net, teacher, net.module, step, context)
    if "fine_tuning" in more_metadata:
        more_metadata["fine_tuning"]["factorized_linear_layers"] = factorized
    net.recipe = {}
    return net, [*notes, *more_notes], {**metadata, **more_metadata}


# --- channels ---------------------------------------------------------------------------------------

def _channels(net: TorchModel, step: Step, context: Context) -> tuple[TorchModel, list[str], dict[str, Any]]:
    """Channel pruning decided on the module's ONNX export (as the onnx backend decides it), done
    on the module."""
    from onnx import numpy_helper

    from compressor_frontends.pytorch.channels import plan_channels
    from compressor_frontends.pytorch.export import export_onnx
    from compressor_frontends.pytorch.finetune import (
        fine_tuning_wanted,
        folded_batch_norms,
        locate_parameters,
    )

    context.progress("exporting to find prunable channels", None)
    graph, path = export_onnx(net, context)
    if graph is None:
        assert path is not None
        import shutil

        shutil.rmtree(path.parent, ignore_errors=True)
        raise UsageError(f"'{step}': the model is past the large-model threshold; use --backend onnx")
    ratio = float(step.params["sparsity"])
    result = plan_channels(graph, ratio, numpy_helper.to_array).result
    notes, metadata = [result.note(ratio)], {"channel_pruning": result.to_json()}
    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    arrays = {name: numpy_helper.to_array(initializers[name]) for name in result.kept}
    del graph, initializers
    located = locate_parameters(net.module, arrays)
    missing = [name for name in arrays if name not in located]
    if missing:
        # The exporter folded a BatchNorm into the Conv before it: do the same to the module.
        net.module, folded = folded_batch_norms(net, net.module, context)
        if folded:
            located.update(locate_parameters(net.module, {name: arrays[name] for name in missing}, close=True))
            missing = [name for name in arrays if name not in located]
            metadata["channel_pruning"]["batch_norms_folded"] = folded
    if missing:
        raise UsageError(f"'{step}': weight(s) {', '.join(missing[:3])} of the exported graph are not parameters "
                         "of the torch model (folded at export, e.g. a BatchNorm into its Conv); use --backend onnx")
    teacher = copy.deepcopy(net.module) if fine_tuning_wanted(step, context) else None
    cuts = {located[name][0]: {(1 - axis) if located[name][1] else axis: kept
                               for axis, kept in result.kept[name].items()} for name in arrays}
    layers = [_owner(net.module, parameter, step) for parameter in cuts]
    for layer, axes in zip(layers, cuts.values()):
        _slice(layer, axes)
    # The report names ONNX nodes (the chain analysis's); these are the modules it sliced.
    metadata["channel_pruning"]["sliced_modules"] = sorted(parameter.rpartition(".")[0] for parameter in cuts)
    more_notes, more_metadata = _fine_tuned(net, teacher, net.module, step, context)
    net.recipe = {}
    return net, [*notes, *more_notes], {**metadata, **more_metadata}


def _owner(module: Any, parameter: str, step: Step) -> Any:
    """The nn.Linear or ungrouped nn.Conv whose weight ``parameter`` is."""
    import torch

    owner_name, _, attribute = parameter.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    convolutions = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    if attribute == "weight" and (type(owner) is torch.nn.Linear
                                  or (type(owner) in convolutions and owner.groups == 1)):
        return owner
    raise UsageError(f"'{step}': {parameter} is not the weight of an nn.Linear or ungrouped nn.Conv; "
                     "use --backend onnx")


def _slice(layer: Any, axes: dict[int, Any]) -> None:
    """Keep only the given indices of ``layer``'s weight along each axis (0: outputs, with
    the bias; 1: inputs) and update its sizes."""
    import torch

    weight = layer.weight.detach()
    for axis, kept in axes.items():
        weight = weight.index_select(axis, torch.as_tensor(kept, dtype=torch.long))
    layer.weight = torch.nn.Parameter(weight.contiguous())
    outputs = "out_features" if isinstance(layer, torch.nn.Linear) else "out_channels"
    inputs = "in_features" if isinstance(layer, torch.nn.Linear) else "in_channels"
    if 0 in axes and layer.bias is not None:
        kept = torch.as_tensor(axes[0], dtype=torch.long)
        layer.bias = torch.nn.Parameter(layer.bias.detach().index_select(0, kept).contiguous())
    setattr(layer, outputs, int(weight.shape[0]))
    setattr(layer, inputs, int(weight.shape[1]))
