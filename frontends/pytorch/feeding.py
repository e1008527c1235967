"""Feeding a torch model from a data file, for the techniques that train or score it:
batches of named tensors, calls that return every output, the data a step uses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from compressor.plugin import CompressionError, Context, Dataset, UsageError
from compressor_frontends.pytorch.model import TorchModel


def is_transformers(module: Any) -> bool:
    import transformers

    return isinstance(module, transformers.PreTrainedModel)


def input_names(model: TorchModel, dataset: Dataset) -> tuple[str, ...]:
    """The inputs fed from ``dataset``: an optional one it lacks is left out."""
    features = dataset.features
    if len(model.input_names) == 1 and model.input_names[0] not in features and len(features) == 1:
        return model.input_names
    missing = [name for name in model.input_names
               if name not in features and name not in model.optional_inputs]
    if missing:
        raise UsageError(f"the data file has no array for the input(s) {', '.join(missing)}", dataset.path)
    return tuple(name for name in model.input_names if name in features)


def batches(model: TorchModel, dataset: Dataset, size: int,
            order: Any = None) -> Iterator[tuple[dict[str, Any], Any]]:
    """(inputs by name as tensors, labels or None) in batches of ``size``, in ``order``
    (indices; default all in file order). Token batches lose the padding no row uses."""
    import numpy as np
    import torch

    names = input_names(model, dataset)
    features = dataset.features
    arrays = {name: features[name] if name in features else next(iter(features.values())) for name in names}
    dtypes = {sample.name: sample.dtype for sample in model.sample_shapes}
    indices = np.arange(dataset.size) if order is None else np.asarray(order)
    for start in range(0, len(indices), size):
        rows = indices[start:start + size]
        batch = {}
        for name, array in arrays.items():
            part = np.asarray(array[rows])
            dtype = dtypes.get(name) or ("float32" if part.dtype.kind == "f" else part.dtype.name)
            batch[name] = torch.from_numpy(np.ascontiguousarray(part.astype(dtype)))
        mask = batch.get("attention_mask")
        if model.keyword_inputs and mask is not None and mask.ndim == 2:
            length = max(int(mask.sum(dim=1).max()), 1)
            batch = {name: t[:, :length] if t.ndim == 2 and t.shape == mask.shape else t
                     for name, t in batch.items()}
        labels = None if dataset.labels is None else torch.from_numpy(np.asarray(dataset.labels)[rows]).long()
        yield batch, labels


def call(model: TorchModel, module: Any, batch: dict[str, Any]) -> tuple[str, Any]:
    """Run ``module`` on ``batch``: the name and tensor of its first output (``logits``,
    ``last_hidden_state``, or ``output`` for a plain module)."""
    return call_all(model, module, batch)[0]


def call_all(model: TorchModel, module: Any, batch: dict[str, Any]) -> list[tuple[str, Any]]:
    """Run ``module`` (``model``'s, or one edited from it) on ``batch``: the name and tensor
    of every output, the first first."""
    from compressor_frontends.pytorch.outputs import flatten_outputs

    result = module(**batch) if model.keyword_inputs else module(*batch.values())
    outputs = flatten_outputs(result)
    if not outputs:
        raise CompressionError("the model returned no tensor")
    return list(outputs)


def data_for(context: Context, *purposes: str) -> Dataset | None:
    """The first of the run's data files for ``purposes`` (calibration, eval, train) given."""
    found = {"calibration": context.calibration_data, "eval": context.eval_data, "train": context.train_data}
    return next((found[p] for p in purposes if found[p] is not None), None)
