"""Every output of a torch module, named and with its dynamic axes, for the export.

A module may return one tensor (``output``), a tuple or list (``output_0``,
``output_1``, ...), a dict or a transformers ``ModelOutput`` (its keys:
``logits``, ``last_hidden_state``, ``pooler_output``), nested (``boxes.0``);
``None`` entries and non-tensors are left out. All of them are exported: a
detector's box and landmark heads are kept, not just its first output.

Which output axes are dynamic is found by running the module twice: on the
example inputs and on twice the batch (and one token fewer for token inputs);
an axis whose size follows is dynamic (``batch``, ``sequence``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compressor.plugin import CompressionError

SINGLE = "output"


@dataclass(frozen=True)
class ExportedOutput:
    name: str
    dynamic_axes: dict[int, str] = field(default_factory=dict)


def flatten_outputs(result: Any, prefix: str = SINGLE, top: bool = True) -> list[tuple[str, Any]]:
    """``[(name, tensor)]`` for every tensor in ``result``, in a stable order."""
    import torch

    if isinstance(result, torch.Tensor):
        return [(prefix, result)]
    if isinstance(result, Mapping):
        found = []
        for key, value in result.items():
            if value is not None:
                found += flatten_outputs(value, str(key) if top else f"{prefix}.{key}", top=False)
        return found
    if isinstance(result, Sequence) and not isinstance(result, str | bytes):
        items = [value for value in result if value is not None]
        if len(items) == 1:
            return flatten_outputs(items[0], prefix, top)
        found = []
        for index, value in enumerate(items):
            found += flatten_outputs(value, f"{prefix}_{index}" if top else f"{prefix}.{index}", top=False)
        return found
    return []


def probe_outputs(call: Any, inputs: Mapping[str, Any], batch_axes: Mapping[str, int | None],
                  declared: Sequence[str] = ()) -> list[ExportedOutput]:
    """Run ``call`` (the module, taking the inputs positionally) on the example and on
    a grown example, and name each output and its dynamic axes."""
    first = _outputs(call, inputs)
    if first is None:
        raise CompressionError("running the model on its example inputs failed (see --debug)")
    grown = _grown(inputs, batch_axes)
    second = _outputs(call, grown) if grown else None
    names = list(declared) if declared and len(declared) == len(first) else [name for name, _ in first]
    sequences = {a.shape[1] for a in inputs.values() if a.dtype.kind in "iu" and a.ndim >= 2}
    outputs = []
    for index, (name, (_, before)) in enumerate(zip(names, first)):
        after = second[index][1] if second is not None and len(second) == len(first) else None
        if after is None:
            axes = {0: "batch"} if before else {}
        else:
            axes = {}
            for axis, (old, new) in enumerate(zip(before, after)):
                if old != new:
                    axes[axis] = ("batch" if (old, new) == (1, 2)
                                  else "sequence" if old in sequences else f"{name}_{axis}")
        outputs.append(ExportedOutput(name, axes))
    return outputs


def _outputs(call: Any, inputs: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]] | None:
    """Each output's name and shape on ``inputs``; None when the model refuses them."""
    import torch

    tensors = tuple(torch.from_numpy(array) for array in inputs.values())
    try:
        with torch.no_grad():
            result = call(*tensors)
    except Exception:  # noqa: BLE001 - the model's own code raises anything; the export reports it
        return None
    return [(name, tuple(tensor.shape)) for name, tensor in flatten_outputs(result)]


def _grown(inputs: Mapping[str, Any], batch_axes: Mapping[str, int | None]) -> dict[str, Any] | None:
    """The example with twice its batch and, for token inputs, one position fewer."""
    import numpy as np

    grown = {}
    for name, array in inputs.items():
        axis = batch_axes.get(name, 0)
        value = array
        if axis is not None and array.ndim > axis:
            value = np.concatenate([value, value], axis=axis)
        if value.dtype.kind in "iu" and value.ndim >= 2 and value.shape[1] > 2 and axis != 1:
            value = value[:, :-1]
        grown[name] = np.ascontiguousarray(value)
    return grown if grown else None
