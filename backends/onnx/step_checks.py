"""The onnx backend's refusals that need the loaded model or the steps' order, made
before anything is exported or trained (``compressor_check_steps``). Each says what
the step itself would say when it ran: a run refused here has done no work."""

from __future__ import annotations

from collections.abc import Sequence

from compressor.plugin import Context, Model, Step, UsageError
from compressor_frontends.pytorch.techniques import check_torch_step


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
            check_torch_step(step, network.torch.module if network.torch is not None else None, context,
                             model.source)
        elif step.technique != "qat":  # qat checks the graph steps before it itself
            if after_qat:
                raise UsageError(f"'{step}' cannot follow qat: the model is an int8 graph already; put it before qat")
            graph_step = True
        if step.technique == "quantize":
            check_quantize_step(step, context)
        if step.technique == "qat":
            after_qat = graph_step = True
