"""The onnx backend's refusals that need the loaded model or the steps' order, made
before anything is exported or trained (``compressor_check_steps``). Each says what
the step itself would say when it ran: a run refused here has done no work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compressor import Context, Model, Step, UsageError


def check_steps(model: Model, steps: Sequence[Step], context: Context) -> None:
    """A torch step (distill, qat, prune structure=head) on a model read as an ONNX graph or
    after a graph step, a graph step after qat, quantize parameters (int4's), and what
    distill and head pruning refuse without training."""
    from compressor_onnx.quantization import check_quantize_step

    network = model.handle
    read_as_graph = not network.is_torch and network.export is None
    graph_step = after_qat = False
    for step in steps:
        torch_step = step.technique == "distill" or step.params.get("structure") == "head"
        if (torch_step or step.technique == "qat") and read_as_graph:
            raise UsageError(f"'{step}' needs the PyTorch or transformers model; "
                             f"{model.source.name} is read as an ONNX graph")
        if torch_step and graph_step:
            raise UsageError(f"'{step}' changes the torch model before its ONNX export: "
                             "put it before quantize, lowrank and prune structure=channel")
        if torch_step:
            check_torch_step(step, network.module, context)
        elif step.technique != "qat":  # qat checks the graph steps before it itself
            if after_qat:
                raise UsageError(f"'{step}' cannot follow qat: the model is an int8 graph already; put it before qat")
            graph_step = True
        if step.technique == "quantize":
            check_quantize_step(step, context)
        if step.technique == "qat":
            after_qat = graph_step = True


def check_torch_step(step: Step, module: Any, context: Context) -> None:
    """What ``distill`` and ``prune structure=head`` refuse before training (the onnx and torch
    backends' steps): head ranking without data, distill's student/layers, layers= too many."""
    from compressor_onnx.heads import data_for

    if step.params.get("structure") == "head" and data_for(context, "calibration", "eval", "train") is None:
        raise UsageError(f"'{step}' ranks heads on data: pass --data or --calibration-data")
    if step.technique != "distill":
        return
    layers = step.params.get("layers")
    if (step.params.get("student") is None) == (layers is None):
        raise UsageError("distill needs exactly one of student=package.module:function or layers=N")
    total = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    if layers is not None and isinstance(total, int) and total > 0 and int(layers) >= total:
        raise UsageError(f"'{step}': the teacher has {total} layers; layers= must be fewer")
