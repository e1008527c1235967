"""Save a :class:`~compressor_frontends.pytorch.TorchModel`: a ``torch.export`` program
(``.pt2``) when the model exports, else its weights as safetensors plus a JSON manifest
to rebuild it.

The program takes the inputs positionally and returns every output flattened
(:mod:`compressor_frontends.pytorch.outputs`: one tensor, tuples, dicts, ``ModelOutput``); its
input and output names, input specs and quantization travel inside the archive
as plain JSON (``extra/compressor.json``). torchao's quantized tensors are
unwrapped into plain tensors and torchao ops first, so the archive holds no
pickled weights and loads under the PyTorch front end's ``.pt2`` safety checks.

The fallback (``NAME.safetensors`` + ``NAME.torch.json``) names how to build the
module (the ``model_factory`` or the transformers class and config) and the
quantization applied; loading rebuilds the structure, quantizes it the same way
and then loads the saved tensors, strictly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compressor.plugin import (
    Artifact,
    CompressionError,
    Context,
    UsageError,
    first_line,
)
from compressor_frontends.pytorch import TorchModel
from compressor_torch.loading import EXTRA_NAME, MANIFEST_FORMAT, manifest_path

SAVED_NOTE = "saved as safetensors + manifest"


def wrap(net: TorchModel) -> Any:
    """A module taking the inputs positionally, casting float inputs to the model's
    dtype and returning every output tensor flattened, float outputs as float32."""
    import torch

    from compressor_frontends.pytorch.outputs import flatten_outputs

    names, by_keyword = net.input_names, net.keyword_inputs
    half = net.dtype == "float16"

    class Forward(torch.nn.Module):
        def __init__(self, module: Any) -> None:
            super().__init__()
            self.module = module

        def forward(self, *inputs: Any) -> tuple[Any, ...]:
            if half:
                inputs = tuple(x.half() if x.is_floating_point() else x for x in inputs)
            result = self.module(**dict(zip(names, inputs))) if by_keyword else self.module(*inputs)
            tensors = tuple(tensor for _, tensor in flatten_outputs(result))
            return tuple(t.float() if t.is_floating_point() else t for t in tensors)

    forward = Forward(net.module)
    # Not .eval(): it recurses, and a reloaded torch.export program refuses train().
    forward.training = False
    return forward


def output_names(net: TorchModel, names: tuple[str, ...], examples: dict[str, Any]) -> tuple[str, ...]:
    """The flattened outputs' names (:mod:`compressor_frontends.pytorch.outputs`), from one run on the examples."""
    import torch

    from compressor_frontends.pytorch.outputs import flatten_outputs

    if net.output_names:
        return net.output_names
    tensors = [torch.from_numpy(examples[name]) for name in names]
    if net.dtype == "float16":
        tensors = [t.half() if t.is_floating_point() else t for t in tensors]
    try:
        with torch.inference_mode():
            result = net.module(**dict(zip(names, tensors))) if net.keyword_inputs else net.module(*tensors)
    except Exception as error:  # noqa: BLE001 - the model's own code raises anything
        raise CompressionError(f"running the model on its example inputs failed ({type(error).__name__}: "
                               f"{first_line(error)})") from None
    found = tuple(name for name, _ in flatten_outputs(result))
    if not found:
        raise CompressionError("the model returns no tensors")
    return found


def example_inputs(net: TorchModel, context: Context) -> dict[str, Any]:
    """Real examples from a data file (else the declared shapes), at least two rows so
    that the batch axis stays dynamic in the export."""
    import numpy as np

    from compressor_frontends.pytorch.export import example_inputs as export_examples

    for dataset in (context.calibration_data, context.eval_data, context.train_data):
        if dataset is not None and _rows(dataset) >= 2:
            from compressor_frontends.pytorch.shapes import sample_from_data

            present = tuple(name for name in net.input_names
                            if name not in net.optional_inputs or name in dataset.features)
            arrays = sample_from_data(dataset, present, rows=2)
            dtypes = {sample.name: sample.dtype for sample in net.sample_shapes}
            return {name: np.ascontiguousarray(array.astype(dtypes.get(name, _default_dtype(array))))
                    for name, array in arrays.items()}
    try:
        arrays = export_examples(net, context)
    except UsageError:
        raise UsageError(
            "saving this PyTorch model needs example inputs: pass a data file "
            "(--data or --calibration-data) or --set input_shape=1,64"
        ) from None
    return {name: np.ascontiguousarray(np.concatenate([array, array]) if array.shape[:1] == (1,) else array)
            for name, array in arrays.items()}


def _rows(dataset: Any) -> int:
    return int(dataset.size or 0)


def _default_dtype(array: Any) -> str:
    return "float32" if array.dtype.kind == "f" else array.dtype.name


def save_net(net: TorchModel, destination: Path, context: Context) -> tuple[Artifact, dict[str, Any], list[str]]:
    """The artifact, facts for the report and notes (why the fallback was used)."""
    wanted = str(context.options.get("save_format") or "auto")
    examples = example_inputs(net, context)
    names = tuple(name for name in net.input_names if name in examples)
    outputs = output_names(net, names, examples)
    if wanted != "safetensors":
        try:
            path = export_program(net, names, outputs, examples, destination.with_suffix(".pt2"))
            return Artifact("torch", path, "pt2"), {"saved_as": "torch.export"}, []
        except CompressionError as error:
            if wanted == "pt2" or not net.recipe:
                raise
            reason = str(error)
    else:
        reason = "--set save_format=safetensors"
    weights, manifest = save_safetensors(net, names, outputs, examples, destination)
    note = f"{SAVED_NOTE}: {reason}"
    return Artifact("torch", weights, "safetensors", (manifest,)), {"saved_as": "safetensors"}, [note]


def _specs(names: tuple[str, ...], examples: dict[str, Any], program: Any | None) -> list[dict[str, Any]]:
    """Each input's name, dtype and shape (None where the export kept the axis dynamic)."""
    shapes: list[tuple[int | None, ...]] = []
    if program is not None:
        user = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
        nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
        for name in user:
            shape = nodes[name].meta["val"].shape
            shapes.append(tuple(dim if isinstance(dim, int) else None for dim in shape))
    else:
        from compressor_frontends.pytorch.shapes import dynamic_shape

        shapes = [dynamic_shape(tuple(examples[name].shape), examples[name].dtype.name) for name in names]
    return [{"name": name, "dtype": examples[name].dtype.name, "shape": list(shape)}
            for name, shape in zip(names, shapes)]


def _facts(net: TorchModel, names: tuple[str, ...], outputs: tuple[str, ...],
           specs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "version": 1, "inputs": list(names), "outputs": list(outputs),
            "specs": specs, "keyword_inputs": net.keyword_inputs, "quantization": list(net.quantization),
            "dtype": net.dtype}


def export_program(net: TorchModel, names: tuple[str, ...], outputs: tuple[str, ...],
                   examples: dict[str, Any], path: Path) -> Path:
    import torch

    from compressor_frontends.pytorch.caches import torch_caches_in_scratch
    from compressor_frontends.pytorch.pt2 import pickled_entries

    if net.quantization and net.quantization[0] in ("dynamic", "int8"):
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(net.module)
    tensors = tuple(torch.from_numpy(examples[name]) for name in names)
    auto = torch.export.Dim.AUTO
    dynamic = tuple({axis: auto for axis in _dynamic_axes(examples[name])} for name in names)
    try:
        with warnings.catch_warnings(), torch.no_grad(), _export_logs_silenced(), torch_caches_in_scratch():
            warnings.simplefilter("ignore")
            program = torch.export.export(wrap(net), tensors, dynamic_shapes=(dynamic,), strict=False)
    except Exception as error:  # noqa: BLE001 - the exporter raises anything a model's code can
        raise CompressionError(f"torch.export failed ({type(error).__name__}: {first_line(error)})") from None
    specs = _specs(names, examples, program)
    extra = json.dumps(_facts(net, names, outputs, specs))
    program.example_inputs = (tuple(_stand_in(tensor) for tensor in tensors), {})
    try:
        torch.export.save(program, str(path), extra_files={EXTRA_NAME: extra})
    except Exception as error:  # noqa: BLE001 - serialization fails on types it cannot write
        path.unlink(missing_ok=True)
        raise CompressionError(f"torch.export.save failed ({type(error).__name__}: {first_line(error)})") from None
    pickled = pickled_entries(path)
    if pickled:
        path.unlink(missing_ok=True)
        raise CompressionError(f"the exported program would hold pickled objects ({pickled[0]})")
    return path


def _stand_in(tensor: Any) -> Any:
    """Zeros of ``tensor``'s shape and dtype over a one-value storage: ``torch.export.save``
    stores the program's example inputs, which were the user's data rows (hundreds of
    KB of them in a deployable file); loaders read only their shapes and dtypes."""
    import torch

    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


def _dynamic_axes(array: Any) -> tuple[int, ...]:
    from compressor_frontends.pytorch.shapes import sequence_axes

    return sequence_axes(array.ndim, array.dtype.name)


def save_safetensors(net: TorchModel, names: tuple[str, ...], outputs: tuple[str, ...],
                     examples: dict[str, Any], destination: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    if not net.recipe:
        raise CompressionError("cannot save as safetensors: nothing says how to rebuild this model")
    if net.quantization and net.quantization[0] in ("dynamic", "int8"):
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(net.module)
    weights = destination.with_suffix(".safetensors")
    state = {key: value.detach().contiguous().clone() for key, value in net.module.state_dict().items()}
    save_file(state, str(weights))
    manifest = manifest_path(weights)
    facts = {**_facts(net, names, outputs, _specs(names, examples, None)), "recipe": net.recipe}
    manifest.write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    return weights, manifest


@contextlib.contextmanager
def _export_logs_silenced() -> Iterator[None]:
    """torch.export logs the traced graph (and guard failures) on the way to an error it
    raises anyway, and a failed export falls back to safetensors: keep the CLI clean."""
    from compressor.plugin import native_output_silenced

    logging.disable(logging.CRITICAL)
    try:
        with native_output_silenced():
            yield
    finally:
        logging.disable(logging.NOTSET)
