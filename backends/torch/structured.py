"""The torch backend's structured techniques, by the onnx backend's torch-level code.

The onnx backend edits the torch model before its export for ``prune
structure=head`` and ``distill`` (``compressor_onnx.heads``, ``distill``) and
fine-tunes edited torch models (``compressor_onnx.finetune``); this backend calls
that code on its own module, seen as a ``compressor_onnx.loading.Network`` that
holds it (:func:`as_network`), and keeps the result a PyTorch model:

* ``lowrank``: every matching ``nn.Linear`` replaced by two Linear layers holding
  the truncated-SVD factors of its weight (``compressor_onnx.lowrank``: the same
  request, ranks, skip rules, factors and report as the onnx graph edit;
  ``finetune.factorize_linears`` builds the layers);
* ``prune structure=head``: ``compressor_onnx.heads.prune_heads``;
* ``prune structure=channel``: the onnx backend's chain analysis
  (``compressor_onnx.channels``) on the module's ONNX export decides which
  outputs go; its kept indices are mapped back to the Linear/Conv parameters
  (``finetune.locate_parameters``, by value) and those modules really sliced;
* ``distill``: ``compressor_onnx.distill.distill``;
* unstructured ``prune`` (``quantize.prune``) is fine-tuned with its zeros kept.

With ``--train-data`` and ``epochs`` > 0 the edited module is fine-tuned against
the unedited one (``finetune.train_student``), else the note says one-shot.
A changed architecture can no longer be rebuilt from the model factory or the
transformers config: such a model is saved as ``.pt2`` only (``recipe`` emptied).
"""

from __future__ import annotations

import copy
from typing import Any

from compressor import CompressionError, Context, Model, Step, UsageError
from compressor_torch.loading import TorchNet, transformers_recipe

#: Steps whose result the safetensors manifest could not rebuild (distill sets its own recipe).
RESHAPING = ("lowrank", "channel", "head")


def kind(step: Step) -> str:
    """``lowrank``, ``distill``, or the prune structure (``unstructured``, ``channel``, ``head``)."""
    if step.technique == "prune":
        return str(step.params.get("structure") or "unstructured")
    return step.technique


def as_network(net: TorchNet) -> Any:
    """The onnx backend's view of ``net``: a Network holding its module, not yet exported."""
    from compressor_onnx.loading import Network

    return Network(module=net.module, input_names=net.input_names, output_names=net.output_names,
                   sample_shapes=net.sample_shapes, keyword_inputs=net.keyword_inputs,
                   optional_inputs=net.optional_inputs)


def check_step(model: Model, step: Step, context: Context) -> None:
    """Refuse, before any work, what this backend cannot do with ``step``."""
    import torch

    net: TorchNet = model.handle
    what = kind(step)
    if net.quantization and what != "unstructured":
        raise UsageError(f"'{step}' changes the float model: put it before quantize")
    program = isinstance(net.module, torch.fx.GraphModule)
    if program and what != "unstructured" and (what != "distill" or step.params.get("student") is None):
        raise UsageError(f"'{step}' needs the model's nn.Module layers, which a .pt2 program does not keep; "
                         "load the state_dict with --set model_factory (or use --backend onnx)")
    if what in RESHAPING and str(context.options.get("save_format") or "auto") == "safetensors":
        raise UsageError(f"'{step}' changes the architecture, which the safetensors manifest cannot rebuild "
                         "from the model factory or config: leave save_format=auto (.pt2)")
    if what == "lowrank":
        from compressor_onnx.lowrank import lowrank_request

        lowrank_request(step.params)


def apply(model: Model, step: Step, context: Context) -> tuple[TorchNet, list[str], dict[str, Any]]:
    """``step`` on the model's module (its own fork): the net, notes and metadata."""
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


def _fine_tuned(net: TorchNet, teacher: Any, student: Any, step: Step, context: Context,
                after_step: Any = None) -> tuple[list[str], dict[str, Any]]:
    """Fine-tuning of ``student`` against ``teacher`` on --train-data, or the one-shot note."""
    from compressor_onnx.finetune import fine_tuning_wanted, one_shot_note, train_student

    if not fine_tuning_wanted(step, context):
        return [one_shot_note(step, context)], {}
    return train_student(as_network(net), teacher, student, step, context, after_step)


def _unstructured(net: TorchNet, step: Step, context: Context) -> tuple[TorchNet, list[str], dict[str, Any]]:
    import torch

    from compressor_onnx.finetune import fine_tuning_wanted
    from compressor_torch.quantize import layer_weights, prune

    sparsity = float(step.params["sparsity"])
    tune = fine_tuning_wanted(step, context) and not isinstance(net.module, torch.fx.GraphModule)
    teacher = copy.deepcopy(net.module) if tune else None
    net, layers = prune(net, sparsity)
    notes = [f"pruned {sparsity:g} of the weights of {layers} layers by magnitude"]
    metadata: dict[str, Any] = {"pruned_layers": layers}
    if teacher is None:
        from compressor_onnx.finetune import one_shot_note

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


def _heads(model: Model, step: Step, context: Context) -> tuple[TorchNet, list[str], dict[str, Any]]:
    from compressor_onnx.heads import prune_heads

    net: TorchNet = model.handle
    teacher = net.module
    network, notes, metadata = prune_heads(_view(model), step, context)  # edits a copy
    more_notes, more_metadata = _fine_tuned(net, teacher, network.module, step, context)
    net.module, net.recipe = network.module.eval(), {}
    return net, [*notes, *more_notes], {**metadata, **more_metadata}


def _distill(model: Model, step: Step, context: Context) -> tuple[TorchNet, list[str], dict[str, Any]]:
    from compressor_onnx.distill import distill
    from compressor_onnx.heads import is_transformers

    net: TorchNet = model.handle
    network, notes, metadata = distill(_view(model), step, context)
    student = network.module.eval()
    factory = step.params.get("student")
    net.module = student
    # The student is rebuilt from its own factory, or the teacher's class with its config.
    net.recipe = ({"factory": str(factory)} if factory is not None
                  else transformers_recipe(student) if is_transformers(student) else {})
    return net, notes, metadata


def _view(model: Model) -> Model:
    """``model`` with the onnx backend's handle, for the onnx backend's torch steps."""
    return Model(model.backend, model.source, "torch", as_network(model.handle), model.inputs)


# --- lowrank ----------------------------------------------------------------------------------------

def _lowrank(net: TorchNet, step: Step, context: Context) -> tuple[TorchNet, list[str], dict[str, Any]]:
    from compressor_onnx.finetune import factorize_linears, fine_tuning_wanted
    from compressor_onnx.lowrank import lowrank_request, nothing_done

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


def plan_lowrank(module: Any, request: Any) -> tuple[Any, dict[tuple[str, bool], int]]:
    """The lowrank result (factorized and skipped layers) of ``module``'s nn.Linear layers,
    and the rank of each weight to factorize, keyed as ``finetune.factorize_linears`` takes them."""
    import torch

    from compressor_onnx.lowrank import LowRankResult, matches, plan_rank

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


# --- channels ---------------------------------------------------------------------------------------

def _channels(net: TorchNet, step: Step, context: Context) -> tuple[TorchNet, list[str], dict[str, Any]]:
    """The onnx backend's channel pruning decided on the module's ONNX export, done on the module."""
    from onnx import numpy_helper

    from compressor_onnx.export import exported
    from compressor_onnx.finetune import fine_tuning_wanted, folded_batch_norms, locate_parameters
    from compressor_onnx.rewrite import apply_step

    context.progress("exporting to find prunable channels", None)
    graph_net = exported(as_network(net), context)
    if graph_net.graph is None:
        raise UsageError(f"'{step}': the model is past the large-model threshold; use --backend onnx")
    _, notes, metadata, result = apply_step(graph_net, step, context)
    initializers = {tensor.name: tensor for tensor in graph_net.graph.graph.initializer}
    arrays = {name: numpy_helper.to_array(initializers[name]) for name in result.kept}
    located = locate_parameters(net.module, arrays)
    missing = [name for name in arrays if name not in located]
    if missing:
        # The exporter folded a BatchNorm into the Conv before it: do the same to the module.
        net.module, folded = folded_batch_norms(as_network(net), net.module, context)
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
