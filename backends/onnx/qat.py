"""``qat``: quantization-aware training of the torch model, exported as a QDQ int8 graph.

The PyTorch front end trains the model with fake-quantized layers
(:mod:`compressor_frontends.pytorch.qat`: int8 per-channel weights, int8 activations,
the layout ONNX Runtime's own static ``quantize int8`` writes). Here it is exported:
torch's ONNX exporter writes each fake quantization as QuantizeLinear +
DequantizeLinear, and each weight's QuantizeLinear is then folded into an int8
initializer (biases of Gemm and Conv into int32 ones, :mod:`compressor_onnx.qdq`), so
the file holds int8 weights and ONNX Runtime runs the layers in int8.

After an unstructured ``prune`` (a graph step) the pruned weights are put back into
the torch model first (:func:`carry_weights`). The result is an int8 graph: later
graph steps are refused (:func:`refuse_after_qat`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compressor.plugin import CompressionError, Context, Model, Step, UsageError
from compressor_onnx.network import Network
from compressor_onnx.torch_steps import check_torch, torch_model, torch_of, with_module


def qat(model: Model, step: Step, context: Context) -> tuple[Network, list[str], dict[str, Any]]:
    """The model trained with fake quantization and exported as QDQ int8: the new
    Network (an ONNX graph), notes and metadata."""
    from compressor_frontends.pytorch.qat import qat_report, train_fake_quantized

    dataset = context.train_data
    if dataset is None:
        raise UsageError(f"'{step}' trains the model: pass --train-data")
    network, original, carried = trainable_model(model, step, context)
    training = train_fake_quantized(torch_of(network), original, step, context, model.source)
    context.progress("exporting the int8 graph", None)
    graph = export_int8(network, training.student, context)
    notes, facts = qat_report(training, step, dataset, carried)
    metadata = {"qat": facts, "quantization": [*model.metadata.get("quantization", []), str(step)]}
    return dataclasses.replace(network, torch=torch_of(network).without_weights(), export=None, graph=graph,
                               path=None), notes, metadata


def trainable_model(model: Model, step: Step, context: Context) -> tuple[Network, Any, int]:
    """The Network and torch model to train, and how many weights came from the graph:
    a graph that ``prune`` (unstructured) edited after export goes back into the torch
    model it was exported from."""
    network: Network = model.handle
    if network.is_torch:
        torch_network, module, _ = torch_model(model, step, context)
        return torch_network, module, 0
    if model.metadata.get("quantization"):
        raise UsageError(f"'{step}' cannot follow '{model.metadata['quantization'][-1]}': the model is quantized "
                         "already; qat replaces quantize")
    if network.export is None:
        check_torch(model, step)  # refuses: the model was read as an ONNX graph
    if network.graph is None:
        raise UsageError(f"'{step}' after a graph step needs the graph in memory; {model.source.name} is past "
                         "the large-model threshold")
    from compressor_onnx.export import exported
    from compressor_onnx.loading import load_network

    fresh, _ = load_network(model.source, context.options, context.trust)
    module = torch_of(fresh).eager()
    torch_network = with_module(network, module)
    reference = exported(torch_network, context).graph
    return torch_network, module, carry_weights(reference, network.graph, module, step)


def carry_weights(reference: Any, edited: Any, module: Any, step: Step) -> int:
    """Copy into ``module`` the weights of ``edited`` that differ from ``reference``, the
    export of ``module`` (same initializer names); each is found among the parameters by
    its value in ``reference``, transposed for a MatMul. The number copied."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    before = {tensor.name: numpy_helper.to_array(tensor) for tensor in reference.graph.initializer}
    after = {tensor.name: numpy_helper.to_array(tensor) for tensor in edited.graph.initializer}
    if before.keys() != after.keys() or any(before[name].shape != after[name].shape for name in before):
        raise UsageError(f"'{step}' can follow only an unstructured prune among the graph steps (lowrank and "
                         "prune structure=channel change the shapes, a torch step before them replaced the "
                         "model): put qat before them")
    from compressor_frontends.pytorch.finetune import locate_parameters

    changed = {name: before[name] for name in before if not np.array_equal(before[name], after[name])}
    located = locate_parameters(module, changed)
    missing = [name for name in changed if name not in located]
    if missing:
        raise UsageError(f"'{step}': weight {missing[0]} of the edited graph is not one parameter of the torch "
                         "model (folded at export?); put qat before the graph steps")
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, (parameter_name, transposed) in located.items():
            parameters[parameter_name].copy_(torch.tensor(after[name].T if transposed else after[name]))
    return len(changed)


def export_int8(network: Network, student: Any, context: Context) -> Any:
    """The fake-quantized ``student`` exported, its weights folded into int8 initializers."""
    from compressor_onnx.export import exported

    done = exported(with_module(network, student), context)
    if done.graph is None:
        raise CompressionError("qat: the exported model is past the large-model threshold; "
                               "its int8 weights are only folded in memory")
    from compressor_onnx.qdq import fold_weights

    return fold_weights(done.graph)


def refuse_after_qat(model: Model, step: Step) -> None:
    """Refuse a graph step (quantize, prune, lowrank) on a model that ``qat`` made int8."""
    if "qat" in model.metadata:
        raise UsageError(f"'{step}' cannot follow qat: the model is an int8 graph already; put it before qat")
