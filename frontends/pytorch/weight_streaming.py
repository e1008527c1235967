"""The TorchScript exporter with the weights written one tensor at a time.

``torch.onnx.export(dynamo=False)`` serializes every weight into one protobuf in memory (and,
past 2 GB, encodes the whole model once in memory before encoding it again with external
data), and its constant folding makes a transposed copy of every ``nn.Linear`` weight: the
export of a 1.8 GB Llama peaked at 4.3x its weights, a 4.4 GB one at 1.45x. Here:

* every ``nn.Linear`` multiplies by a transposed *view* of its weight (``x @ W.T + b``, the
  graph the exporter writes for ``linear`` once folded: ``MatMul`` by an initializer, then
  ``Add(bias, ...)``), so folding has nothing to copy; the view is written contiguous, one
  tensor at a time;
* the exporter's C++ encoder gets no weights (they stay graph inputs); they are then made
  initializers with external data, written to ``<file>.data`` one tensor at a time from the
  values the exporter traced (folded constants included).

Inputs, outputs, node order and every initializer's value are those of a plain export.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Tensors smaller than this stay inside the graph (onnx's own default threshold).
INLINE_BYTES = 1024
#: Floating tensors up to this many elements still go to the exporter's shape inference.
SMALL_ELEMENTS = 65_536
#: What the data file beside ``exported.onnx`` is called.
DATA_SUFFIX = ".data"


@contextlib.contextmanager
def streamed_weights(module: Any, target: Path) -> Iterator[None]:
    """Within: ``torch.onnx.export(module or a wrapper of it, ..., str(target), dynamo=False)``
    writes a graph without weights. On leaving without an error, the weights are written as
    external data beside ``target`` and the graph saved again. ``module`` is restored."""
    captured: dict[str, Any] = {}
    with _linear_by_views(module), _weights_held_back(captured):
        yield
    if captured:
        _write_weights(target, captured)


@contextlib.contextmanager
def _linear_by_views(module: Any) -> Iterator[None]:
    import torch

    patched = []
    for layer in module.modules():
        # A hook (pruning's mask, weight norm) may set the weight anew on every call.
        if type(layer) is torch.nn.Linear and "forward" not in vars(layer) and "weight" in layer._parameters \
                and not (layer._forward_pre_hooks or layer._forward_hooks):
            layer.weight_by_view = torch.nn.Parameter(layer.weight.detach().t(), requires_grad=False)
            layer.forward = types.MethodType(_forward_by_view, layer)
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward
            del layer.weight_by_view


def _forward_by_view(layer: Any, features: Any) -> Any:
    import torch

    if features.dim() == 2 and layer.bias is not None:  # the exporter writes Gemm for this one
        return torch.nn.functional.linear(features, layer.weight, layer.bias)
    product = torch.matmul(features, layer.weight_by_view)
    return product if layer.bias is None else layer.bias + product


@contextlib.contextmanager
def _weights_held_back(captured: dict[str, Any]) -> Iterator[None]:
    """The C++ encoder is handed no weights (what it was handed is kept in ``captured``), and
    whole-graph shape inference only the small ones: it copies each weight a node reads into
    a one-node model, three times over (0.74 GB at once for a 262 MB embedding)."""
    import torch

    graph_type, bindings = torch._C.Graph, torch._C
    encode = graph_type._export_onnx
    infer = bindings._jit_pass_onnx_graph_shape_type_inference

    def encode_without_weights(graph: Any, weights: dict[str, Any], *rest: Any) -> Any:
        captured.clear()
        captured.update(weights)
        return encode(graph, {}, *rest)

    def infer_from_small_weights(graph: Any, weights: dict[str, Any], *rest: Any) -> Any:
        return infer(graph, {name: value for name, value in weights.items() if _shape_like(value)}, *rest)

    graph_type._export_onnx = encode_without_weights
    bindings._jit_pass_onnx_graph_shape_type_inference = infer_from_small_weights
    try:
        yield
    finally:
        graph_type._export_onnx = encode
        bindings._jit_pass_onnx_graph_shape_type_inference = infer


def _shape_like(value: Any) -> bool:
    """A value shape inference may read (an integer tensor, or a small one): not a weight."""
    import torch

    return not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() <= SMALL_ELEMENTS


def _write_weights(target: Path, weights: dict[str, Any]) -> None:
    import onnx
    import torch

    graph = onnx.load(str(target), load_external_data=False)
    data_name = target.name + DATA_SUFFIX
    kept_inputs, offset = [], 0
    with open(target.parent / data_name, "wb") as data:
        for value in graph.graph.input:
            tensor = weights.get(value.name)
            if tensor is None:
                kept_inputs.append(value)
                continue
            flat = tensor.detach().contiguous().reshape(-1)
            initializer = onnx.TensorProto(name=value.name, data_type=value.type.tensor_type.elem_type,
                                           dims=list(tensor.shape))
            raw = flat.view(torch.uint8).numpy() if flat.numel() else b""
            if len(raw) < INLINE_BYTES:
                initializer.raw_data = bytes(raw)
            else:
                data.write(memoryview(raw))
                initializer.data_location = onnx.TensorProto.EXTERNAL
                for key, text in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    initializer.external_data.add(key=key, value=text)
                offset += len(raw)
            graph.graph.initializer.append(initializer)
            del flat, raw
    del graph.graph.input[:]
    graph.graph.input.extend(kept_inputs)
    if offset == 0:
        (target.parent / data_name).unlink()
    onnx.save_model(graph, str(target))
