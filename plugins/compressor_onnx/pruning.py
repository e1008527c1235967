"""Magnitude pruning: the smallest weights of each layer become real zeros.

A torch module is pruned before export with ``torch.nn.utils.prune`` and the
masks are made permanent (``prune.remove``), so the exported graph holds plain
weight tensors with zeros and no mask multiplications. A model that is already
an ONNX graph has the weight initializers of its MatMul/Gemm/Conv nodes pruned
in place.
"""

from __future__ import annotations

from typing import Any

from compressor_onnx.loading import Network

#: The weight input of these ONNX ops (input 1) is pruned; Gather (embeddings) is not.
PRUNABLE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


def prune_network(network: Network, sparsity: float) -> int:
    """Zero the ``sparsity`` share of smallest-magnitude weights per layer; return layers pruned.

    The network is a torch module or an ONNX graph (callers export
    ``torch.export`` programs first).
    """
    if network.module is not None:
        return _prune_module(network.module, sparsity)
    return _prune_graph(network.graph, sparsity)


def _prune_module(module: Any, sparsity: float) -> int:
    import torch
    from torch.nn.utils import prune

    layers = [
        layer for layer in module.modules()
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d)
    ]
    for layer in layers:
        prune.l1_unstructured(layer, name="weight", amount=sparsity)
        prune.remove(layer, "weight")
    return len(layers)


def _prune_graph(graph: Any, sparsity: float) -> int:
    import numpy as np
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    weight_names = {
        node.input[1] for node in graph.graph.node
        if node.op_type in PRUNABLE_OPS and len(node.input) > 1 and node.input[1] in initializers
    }
    pruned = 0
    for name in sorted(weight_names):
        tensor = initializers[name]
        weights = numpy_helper.to_array(tensor)
        if weights.dtype.kind != "f" or weights.size < 2:
            continue
        cut = int(round(sparsity * weights.size))
        if cut == 0:
            continue
        smallest = np.argsort(np.abs(weights), axis=None)[:cut]
        flat = weights.copy().reshape(-1)
        flat[smallest] = 0
        tensor.CopyFrom(numpy_helper.from_array(flat.reshape(weights.shape), name))
        pruned += 1
    return pruned


def sparsity_of(graph: Any) -> float:
    """Share of exact zeros among the prunable weights of ``graph``."""
    import numpy as np
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    zeros = total = 0
    for node in graph.graph.node:
        if node.op_type in PRUNABLE_OPS and len(node.input) > 1 and node.input[1] in initializers:
            weights = numpy_helper.to_array(initializers[node.input[1]])
            zeros += int(np.count_nonzero(weights == 0))
            total += weights.size
    return zeros / total if total else 0.0
