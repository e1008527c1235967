"""The torch backend's techniques, with PyTorch's own tools.

* ``quantize dynamic``: int8 weights and int8 activations quantized at run time,
  in every ``nn.Linear`` (torchao ``Int8DynamicActivationInt8WeightConfig``, the
  successor of the deprecated ``torch.ao.quantization.quantize_dynamic``, whose
  packed weights neither ``torch.export`` nor safetensors can hold).
* ``quantize int8``: int8 weight-only ``nn.Linear`` (torchao ``Int8WeightOnlyConfig``).
* ``quantize fp16``: every parameter and buffer in float16; float inputs are cast
  inside the saved program and outputs come back as float32.
* ``prune S``: per layer (``nn.Linear``, ``nn.Conv*``), the share ``S`` of weights
  smallest in magnitude set to zero in place: permanent, no pruning masks left.

int4 is not offered: torchao 0.18's packed int4 (``Int4WeightOnlyConfig``) needs
the CUDA-only ``mslk`` kernels, and its CPU int4 (``IntxWeightOnlyConfig``) keeps
one byte per weight, so it would lose int4's accuracy without int4's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from compressor.plugin import CompressionError, Step, UnsupportedError, UsageError
from compressor_frontends.pytorch import TorchModel

TORCHAO_MODES = ("dynamic", "int8")


def import_torchao(mode: str = "dynamic") -> Any:
    """``torchao.quantization`` (its start-up warnings are silenced in ``__init__``)."""
    from compressor_frontends.pytorch.caches import torch_caches_in_scratch

    try:
        with torch_caches_in_scratch():  # torchao's import makes torch's cache folder
            import torchao.quantization as quantization
    except ImportError:
        raise UnsupportedError(
            f"quantize {mode} on the torch backend needs torchao; install it with: "
            "pip install 'compressor[torch]'"
        ) from None
    return quantization


def torchao_config(mode: str) -> Any:
    """The torchao config of a quantize mode (imports torchao)."""
    quantization = import_torchao(mode)
    if mode == "dynamic":
        return quantization.Int8DynamicActivationInt8WeightConfig()
    return quantization.Int8WeightOnlyConfig()


def linear_filter() -> Callable[[Any, str], bool]:
    import torch

    def is_linear(module: Any, name: str) -> bool:
        return type(module) is torch.nn.Linear

    return is_linear


#: Why fp16 of a ``.pt2`` program is refused, and what to pass instead.
PROGRAM_FP16 = ("quantize fp16: a .pt2 program checks the float32 dtypes it was exported with; quantize "
                "dynamic or int8 it, or load its state_dict with --set model_factory for fp16")


def check_quantize_steps(net: TorchModel, steps: Sequence[Step]) -> None:
    """What :func:`quantize` would refuse, said before any work (nothing imported but what
    loading the model did)."""
    from importlib.util import find_spec

    import torch

    modes = [str(step.mode) for step in steps if step.technique == "quantize"]
    if net.quantization and modes:
        raise UsageError(f"the model is already quantized ({', '.join(net.quantization)}); quantize once, last")
    if len(modes) > 1:
        raise UsageError(f"quantize {modes[1]} after quantize {modes[0]}: quantize once, last")
    for mode in modes:
        if mode in TORCHAO_MODES and find_spec("torchao") is None:
            raise UnsupportedError(f"quantize {mode} on the torch backend needs torchao; install it with: "
                                   "pip install 'compressor[torch]'")
        if mode == "fp16" and isinstance(net.module, torch.fx.GraphModule):
            raise UsageError(PROGRAM_FP16)


def quantize(net: TorchModel, mode: str) -> tuple[TorchModel, list[str], dict[str, Any]]:
    """``net`` quantized in place (it is the variant's own fork): notes and facts."""
    if net.quantization:
        raise CompressionError(
            f"the model is already quantized ({', '.join(net.quantization)}); quantize once, last"
        )
    if mode == "fp16":
        import torch

        if isinstance(net.module, torch.fx.GraphModule):
            raise CompressionError(PROGRAM_FP16)
        net.module = net.module.half()
        net.dtype = "float16"
        notes = ["float16 parameters; float inputs cast to float16 inside the model, outputs back to float32"]
        net.quantization = (mode,)
        return net, notes, {}
    restored = restore_linears(net.module)
    linears = count_linears(net.module)
    if linears == 0:
        raise CompressionError(f"quantize {mode}: no nn.Linear layers (or linear calls on weights) to quantize")
    import warnings

    config = torchao_config(mode)
    from torchao.quantization import quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quantize_(net.module, config, filter_fn=linear_filter())
        except Exception as error:  # noqa: BLE001 - torchao raises whatever a layer's shape triggers
            from compressor.plugin import first_line

            raise CompressionError(f"torchao quantize {mode} failed ({type(error).__name__}: "
                                   f"{first_line(error)})") from None
    net.quantization = (mode,)
    what = ("int8 weights and run-time int8 activations" if mode == "dynamic" else "int8 weights, float compute")
    notes = [f"torchao: {what} in {linears} nn.Linear layers"]
    if restored.made:
        notes.append(f"the .pt2 program's {restored.made} linear call(s) made nn.Linear layers again to quantize"
                     + (f"; {restored.skipped} left float ({restored.why})" if restored.skipped else ""))
    return net, notes, {"quantized_layers": linears}


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_linears` did: layers made, linear calls left alone and why."""

    made: int = 0
    skipped: int = 0
    why: str = ""


#: The name of the nn.Linear made for a .pt2 program's ``index``-th linear call.
RESTORED_NAME = "compressor_linear_{index}"


def restore_linears(module: Any) -> Restored:
    """In a ``torch.export`` program's module (``ExportedProgram.module()``: a graph of
    ``aten.linear`` calls on its parameters, no ``nn.Linear`` left), make each linear call
    whose 2-D float weight (and bias) no other node reads an ``nn.Linear`` holding those
    parameters, called in its place: what torchao quantizes, and the program saved
    afterwards holds only the quantized weights. Nothing changes in other modules."""
    import torch

    if not isinstance(module, torch.fx.GraphModule) or count_linears(module):
        return Restored()
    graph = module.graph
    made = skipped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        parameters = [node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")]
        found = [_linear_parameter(module, source) for source in parameters]
        weight, bias = found
        if (node.kwargs.keys() - {"bias"} or weight is None or weight.ndim != 2
                or (parameters[1] is not None and bias is None)):
            skipped += 1
            continue
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
        name = RESTORED_NAME.format(index=made)
        module.add_submodule(name, layer)
        with graph.inserting_before(node):
            call = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        for source in parameters:
            if source is not None and not source.users:
                _remove_attribute(module, str(source.target))
                graph.erase_node(source)
        made += 1
    if made:
        graph.lint()
        module.recompile()
    return Restored(made, skipped, "weights shared with other calls, or not plain parameters" if skipped else "")


def _linear_parameter(module: Any, source: Any) -> Any:
    """The float tensor a ``get_attr`` node read by this linear call alone holds, else None."""
    import torch

    if getattr(source, "op", None) != "get_attr" or len(source.users) != 1:
        return None
    value = _attribute(module, str(source.target))
    return value if isinstance(value, torch.Tensor) and value.is_floating_point() else None


def _remove_attribute(module: Any, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    delattr(owner, name)


def count_linears(module: Any) -> int:
    import torch

    return sum(1 for layer in module.modules() if type(layer) is torch.nn.Linear)


def prune(net: TorchModel, sparsity: float) -> tuple[TorchModel, int]:
    """Zero the ``sparsity`` share of smallest-magnitude weights of every Linear/Conv, in place."""
    import torch

    if net.quantization:
        raise CompressionError("prune after quantize: prune the float model first (put prune before quantize)")
    weights = layer_weights(net.module)
    if not weights:
        raise CompressionError("no nn.Linear/Conv layers (or linear/convolution calls) to prune")
    with torch.no_grad():
        for weight in weights:
            drop = int(round(sparsity * weight.numel()))
            if drop > 0:
                threshold = weight.abs().flatten().kthvalue(drop).values
                weight.mul_((weight.abs() > threshold).to(weight.dtype))
    return net, len(weights)


def layer_weights(module: Any) -> list[Any]:
    """The weights of Linear/Conv modules; in a module with none (a loaded ``.pt2``
    program), the weights its linear and convolution calls read."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    found = [layer.weight for layer in module.modules() if isinstance(layer, kinds) and layer.weight is not None]
    if found or not isinstance(module, torch.fx.GraphModule):
        return found
    aten = torch.ops.aten
    calls = {aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
             aten.convolution.default}
    seen: dict[int, Any] = {}
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in calls and len(node.args) > 1:
            source = node.args[1]
            if getattr(source, "op", None) == "get_attr":
                weight = _attribute(module, str(source.target))
                if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                    seen.setdefault(id(weight), weight)
    return list(seen.values())


def _attribute(module: Any, target: str) -> Any:
    value = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
