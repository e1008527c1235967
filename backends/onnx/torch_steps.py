"""Steps on the torch model before its export (``distill``, ``qat``, ``prune
structure=head``), by the PyTorch front end on the handle's torch model.

A torch step takes a private copy of the handle's torch model (forks share one
module through the ExportCache; once the export released it, the model is read
again from its file), changes it, and returns a Network that holds the new
module and no export, so later steps export it afresh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compressor.plugin import Context, Model, Step, UsageError
from compressor_frontends.pytorch import TorchModel
from compressor_onnx.network import Network


def torch_model(model: Model, step: Step, context: Context) -> tuple[Network, Any, bool]:
    """The handle's Network, its torch model (a module, or a ``torch.export`` program's
    module) and whether that object is a fresh copy nobody else holds."""
    network = check_torch(model, step)
    held = network.torch
    assert held is not None
    cache = network.export
    module = held.module if held.module is not None else (cache.module if cache else None)
    program = held.exported_program if held.exported_program is not None else (
        cache.exported_program if cache else None)
    if module is None and program is None:
        # The shared export has released the torch model: read it again.
        from compressor_onnx.loading import load_network

        fresh, _ = load_network(model.source, context.options, context.trust)
        assert fresh.torch is not None
        return network, fresh.torch.eager(), True
    return network, module if module is not None else program.module(), False


def check_torch(model: Model, step: Step) -> Network:
    """The handle's Network, refused unless it still holds a torch model."""
    network: Network = model.handle
    if not network.is_torch:
        if network.export is None:  # loaded as a graph, never a torch model
            raise UsageError(f"'{step}' needs the PyTorch or transformers model; "
                             f"{model.source.name} is read as an ONNX graph")
        raise UsageError(f"'{step}' changes the torch model before its ONNX export: "
                         "put it before quantize, lowrank and prune structure=channel")
    return network


def torch_of(network: Network) -> TorchModel:
    """The network's torch model description (a Network exported from one keeps it)."""
    if network.torch is None:
        raise UsageError("the model is an ONNX graph, not a PyTorch model")
    return network.torch


def with_module(network: Network, module: Any) -> Network:
    """A Network holding ``module``, to be exported afresh by the next graph step."""
    return dataclasses.replace(network, torch=torch_of(network).with_module(module), export=None,
                               graph=None, path=None)


def distill_step(model: Model, step: Step, context: Context) -> tuple[Network, list[str], dict[str, Any]]:
    """``distill``: the student (a Network holding it), notes and metadata."""
    from compressor_frontends.pytorch.distill import distill

    network, teacher, _ = torch_model(model, step, context)
    student, notes, metadata = distill(torch_of(network), teacher, step, context, model.source)
    return with_module(network, student), notes, metadata


def prune_heads_step(model: Model, step: Step, context: Context) -> tuple[Network, list[str], dict[str, Any]]:
    """``prune structure=head``, fine-tuned against the unpruned model when there is train data."""
    from compressor_frontends.pytorch.finetune import (
        fine_tuning_wanted,
        one_shot_note,
        train_student,
    )
    from compressor_frontends.pytorch.heads import prune_heads

    network, module, fresh = torch_model(model, step, context)
    held = torch_of(network)
    if not fine_tuning_wanted(step, context):
        pruned, notes, metadata = prune_heads(held, module, fresh, step, context, model.source)
        return with_module(network, pruned), [*notes, one_shot_note(step, context)], metadata
    # The unpruned model is the teacher: read it at most once; prune_heads edits a copy of it.
    pruned, notes, metadata = prune_heads(held, module, False, step, context, model.source)
    more_notes, more_metadata = train_student(held, module, pruned, step, context)
    return with_module(network, pruned), [*notes, *more_notes], {**metadata, **more_metadata}
