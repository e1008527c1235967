"""Export a :class:`~compressor_frontends.pytorch.TorchModel` to an ONNX graph.

Modules go through the TorchScript exporter (``dynamo=False``): its graphs
quantize cleanly and take ``dynamic_axes`` for batch and sequence.
``torch.export`` programs can only go through the dynamo exporter, whose
graphs carry ``value_info`` that breaks ONNX Runtime's quantizer
(``ShapeInferenceError``), so :func:`strip_value_info` drops it.

Exports past the large-model threshold (:func:`large_model_bytes`) stay on disk in
the run's scratch folder, with the external data the exporter wrote; smaller ones
come back as an in-memory graph. The onnx backend keeps one export per loaded model
and shares it with every fork; this module only exports.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Context, UsageError, first_line
from compressor_frontends.pytorch.model import TorchModel
from compressor_frontends.pytorch.shapes import sample_from_data, sequence_axes, synthetic_inputs

DEFAULT_OPSET = 17
#: The dynamo exporter's oldest well-supported opset.
DYNAMO_MIN_OPSET = 18
_AXIS_NAMES = {0: "batch", 1: "sequence"}
#: Default size (graph plus weights) past which a model stays on disk as an ONNX file
#: with external data instead of an in-memory proto (protobuf's limit is 2 GB).
LARGE_MODEL_BYTES = 1_800_000_000
#: Environment variable overriding LARGE_MODEL_BYTES; tests lower it to take the
#: large-model path with small models. An environment variable so that child
#: processes see it too.
LARGE_MODEL_VARIABLE = "COMPRESSOR_LARGE_MODEL_BYTES"


def large_model_bytes() -> int:
    """The large-model threshold in bytes, read at call time."""
    text = os.environ.get(LARGE_MODEL_VARIABLE, "").strip()
    if not text:
        return LARGE_MODEL_BYTES
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"{LARGE_MODEL_VARIABLE}={text!r} is not a positive number of bytes")
    return value


def export_onnx(model: TorchModel, context: Context) -> tuple[Any | None, Path | None]:
    """Export the torch model: ``(graph, None)``, or ``(None, path)`` for a large one
    (a file in a new folder of ``context.workdir``, removed on failure)."""
    opset = int(context.options.get("opset") or DEFAULT_OPSET)
    folder = Path(tempfile.mkdtemp(prefix="export-", dir=context.workdir))
    # A file, not a buffer: models past 2 GB are written with external data.
    target = folder / "exported.onnx"
    try:
        if model.exported_program is not None:
            graph = _export_program(model, max(opset, DYNAMO_MIN_OPSET), target)
        else:
            _export_module(model, context, target, opset)
            graph = None if _is_large_export(folder) else _load(target)
        if graph is not None:
            shutil.rmtree(folder, ignore_errors=True)
            return graph, None
        return None, target
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _is_large_export(folder: Path) -> bool:
    return sum(entry.stat().st_size for entry in folder.iterdir()) > large_model_bytes()


def _load(target: Path) -> Any:
    import onnx

    return onnx.load(str(target))


def _export_module(model: TorchModel, context: Context, target: Path, opset: int) -> None:
    import torch

    from compressor_frontends.pytorch.outputs import probe_outputs

    inputs = example_inputs(model, context)
    names = tuple(name for name in model.input_names if name in inputs)
    if isinstance(model.module, torch.jit.ScriptModule):
        wrapper = model.module  # TorchScript exports as it is; it cannot be traced inside a wrapper
    else:
        wrapper = wrap_forward(model.module, names, model.keyword_inputs)
    batch_axes = {name: _batch_axis(name, context) for name in names}
    module = model.module

    def call(*tensors: Any) -> Any:
        return module(**dict(zip(names, tensors))) if model.keyword_inputs else module(*tensors)

    outputs = probe_outputs(call, {name: inputs[name] for name in names}, batch_axes, model.output_names)
    tensors = tuple(torch.from_numpy(inputs[name]) for name in names)
    axes = {name: _input_axes(inputs[name], batch_axes[name]) for name in names}
    axes.update({output.name: output.dynamic_axes for output in outputs})
    exporting = dataclasses.replace(model, input_names=names,
                                    output_names=tuple(output.name for output in outputs))
    _run_exporter(wrapper, tensors, target, exporting, axes, opset)


def _batch_axis(name: str, context: Context) -> int | None:
    """``--set batch_axis.NAME=K`` (or none) for an input, else 0."""
    declared = context.options.get(f"batch_axis.{name}")
    if declared is None:
        return 0
    return None if str(declared).lower() == "none" else int(declared)


def _input_axes(array: Any, batch_axis: int | None) -> dict[int, str]:
    """The batch axis, and the sequence axis of integer (token) inputs, are dynamic."""
    axes = {axis: _AXIS_NAMES[axis] for axis in sequence_axes(array.ndim, array.dtype.name) if axis != 0}
    if batch_axis is not None and array.ndim > batch_axis:
        axes[batch_axis] = "batch"
    return dict(sorted(axes.items()))


def _run_exporter(
    wrapper: Any, tensors: tuple[Any, ...], target: Path, model: TorchModel,
    axes: dict[str, dict[int, str]], opset: int,
) -> None:
    import torch

    from compressor.plugin import native_output_silenced
    from compressor_frontends.pytorch.weight_streaming import streamed_weights

    try:
        # The exporter prints its whole IR graph to stdout, from C++, when it fails.
        with warnings.catch_warnings(), torch.no_grad(), native_output_silenced(stderr=False), \
                streamed_weights(wrapper, target):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                tensors,
                str(target),
                input_names=list(model.input_names),
                output_names=list(model.output_names),
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    except Exception as error:  # noqa: BLE001 - the exporter raises anything a model's code can
        raise CompressionError(f"ONNX export failed ({type(error).__name__}: {first_line(error)})") from None


def _export_program(model: TorchModel, opset: int, target: Path) -> Any | None:
    """The program's graph in memory, or None once a large one is saved as ``target``."""
    import onnx
    import torch

    from compressor_frontends.pytorch.caches import torch_caches_in_scratch

    try:
        with warnings.catch_warnings(), torch_caches_in_scratch():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.exported_program,
                (),
                dynamo=True,
                opset_version=opset,
                input_names=list(model.input_names),
                output_names=list(model.output_names),
                verbose=False,
            )
    except Exception as error:  # noqa: BLE001 - the exporter raises anything a model's code can
        raise CompressionError(f"ONNX export failed ({type(error).__name__}: {first_line(error)})") from None
    weights = sum(
        value.const_value.nbytes for value in program.model.graph.initializers.values()
        if value.const_value is not None
    )
    if weights <= large_model_bytes():
        return strip_value_info(program.model_proto)
    program.save(str(target), external_data=True)
    # The graph alone, without its external data, rewritten without value_info.
    onnx.save_model(strip_value_info(onnx.load(str(target), load_external_data=False)), str(target))
    return None


def strip_value_info(graph: Any) -> Any:
    """Drop intermediate shape annotations (ONNX Runtime infers them again on load).

    The quantizer trips on the dynamo exporter's; and on quantized graphs they
    let ONNX Runtime fuse Add + LayerNormalization into SkipLayerNormalization,
    whose CPU kernel is slower here: all-MiniLM-L6-v2 dynamic int8 took 22.3 ms
    without them and 23.5 ms with them (best 0.5 s window, batch 1, sequence 128).
    """
    del graph.graph.value_info[:]
    return graph


def example_inputs(model: TorchModel, context: Context) -> dict[str, Any]:
    """Export inputs: real examples from a data file, else the declared shapes. An
    optional input (a transformer's token_type_ids) the data lacks is left out."""
    for dataset in (context.calibration_data, context.eval_data, context.train_data):
        if dataset is not None:
            present = tuple(name for name in model.input_names
                            if name not in model.optional_inputs or name in dataset.features)
            arrays = sample_from_data(dataset, present)
            if not model.sample_shapes:
                return {name: array.astype("float32") if array.dtype.kind == "f" else array
                        for name, array in arrays.items()}
            dtypes = {sample.name: sample.dtype for sample in model.sample_shapes}
            return {name: array.astype(dtypes[name]) for name, array in arrays.items()}
    if model.sample_shapes:
        return synthetic_inputs(model.sample_shapes, context.seed)
    raise UsageError(
        "exporting this PyTorch model to ONNX needs example inputs: pass a data file "
        "(--data or --calibration-data) or --set input_shape=1,64"
    )


def wrap_forward(module: Any, names: tuple[str, ...], by_keyword: bool) -> Any:
    """A module taking the ONNX inputs positionally and returning every tensor the
    module returns, flattened in a stable order (see :mod:`compressor_frontends.pytorch.outputs`)."""
    import torch

    from compressor_frontends.pytorch.outputs import flatten_outputs

    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module

        def forward(self, *inputs: Any) -> Any:
            result = self.module(**dict(zip(names, inputs))) if by_keyword else self.module(*inputs)
            tensors = tuple(tensor for _, tensor in flatten_outputs(result))
            return tensors[0] if len(tensors) == 1 else tensors

    return Forward()
