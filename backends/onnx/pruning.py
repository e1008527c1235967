"""Magnitude pruning: the smallest weights of each layer become real zeros.

The weight initializers of the graph's MatMul/Gemm/Conv nodes are pruned (weights
held by ``Constant`` nodes are made initializers first), so the graph holds plain
weight tensors with zeros and no mask multiplications. A
torch model is exported first (once per run, shared with the other variants):
a Linear or Conv layer's weight is the same tensor in the graph (transposed for
MatMul), so the same smallest magnitudes become zero as with
``torch.nn.utils.prune`` on the module. Large models are pruned on disk, one
tensor at a time (``large.prune_large``).
"""

from __future__ import annotations

from typing import Any

#: The weight input of these ONNX ops (input 1) is pruned; Gather (embeddings) is not.
PRUNABLE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


#: Float element types whose weights are pruned.
_FLOAT_TYPES = (1, 10, 11)  # FLOAT, FLOAT16, DOUBLE


def prune_graph(graph: Any, sparsity: float) -> tuple[Any, int]:
    """Zero the ``sparsity`` share of smallest-magnitude weights per layer of an
    in-memory graph: a pruned copy and the number of layers pruned. Weights held by
    ``Constant`` nodes (older exporters, Paddle, TensorFlow) become initializers first,
    as quantization makes them (:func:`compressor_frontends.pytorch.onnx_graph.constants_to_initializers`)."""
    import onnx
    from onnx import numpy_helper

    from compressor_frontends.pytorch.onnx_graph import constants_to_initializers

    pruned = onnx.ModelProto()
    pruned.CopyFrom(graph)
    constants_to_initializers(pruned)
    names = prunable_weights(pruned, sparsity)
    for tensor in pruned.graph.initializer:
        if tensor.name in names:
            weights = prune_array(numpy_helper.to_array(tensor), sparsity)
            tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
    return pruned, len(names)


def prunable_weights(graph: Any, sparsity: float) -> set[str]:
    """Names of the float weight initializers (input 1 of PRUNABLE_OPS) that pruning changes."""
    import math

    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    names = set()
    for node in graph.graph.node:
        if node.op_type in PRUNABLE_OPS and len(node.input) > 1 and node.input[1] in initializers:
            tensor = initializers[node.input[1]]
            size = math.prod(tensor.dims)
            if tensor.data_type in _FLOAT_TYPES and size >= 2 and int(round(sparsity * size)) > 0:
                names.add(tensor.name)
    return names


def prune_array(weights: Any, sparsity: float) -> Any:
    """A copy of ``weights`` with its ``sparsity`` share of smallest magnitudes set to zero."""
    import numpy as np

    cut = int(round(sparsity * weights.size))
    smallest = np.argsort(np.abs(weights), axis=None)[:cut]
    flat = weights.copy().reshape(-1)
    flat[smallest] = 0
    return flat.reshape(weights.shape)


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
