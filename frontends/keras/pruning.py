"""Magnitude pruning with tensorflow-model-optimization: fine-tuned with a polynomial
schedule when training data is given (:func:`~compressor_frontends.keras.training.fit`),
one-shot otherwise."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compressor.plugin import CompressionError, Dataset, ProgressCallback, TensorSpec
from compressor_frontends.keras import frameworks
from compressor_frontends.keras.training import fit


@dataclass
class PruneResult:
    model: Any
    #: Share of zeros among the weights tensorflow-model-optimization prunes.
    sparsity: float
    note: str


def prune(
    model: Any,
    params: Mapping[str, Any],
    inputs: Sequence[TensorSpec],
    train: Dataset | None,
    seed: int,
    progress: ProgressCallback,
) -> PruneResult:
    target = float(params["sparsity"])
    epochs = int(params["epochs"])
    tfmot = frameworks.model_optimization()
    frameworks.keras().utils.set_random_seed(seed)
    if train is None or epochs == 0:
        reason = "no --train-data" if train is None else "epochs=0"
        wrapped = _wrap(tfmot, model, tfmot.sparsity.keras.ConstantSparsity(target, begin_step=0))
        _prune_once(wrapped, target)
        note = f"pruned one-shot to sparsity {target:g} by weight magnitude ({reason}: no fine-tuning)"
    else:
        wrapped, how = _fine_tune(tfmot, model, params, inputs, train, epochs, progress)
        note = f"pruned to sparsity {target:g} with {epochs} epoch(s) of fine-tuning on {train.path.name} ({how})"
    achieved = _sparsity(wrapped)
    return PruneResult(tfmot.sparsity.keras.strip_pruning(wrapped), achieved, note)


def _wrap(tfmot: Any, model: Any, schedule: Any) -> Any:
    try:
        return tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    except (ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressionError(f"tensorflow-model-optimization cannot prune this model: {first}") from None


def _pruning_variables(wrapped: Any) -> list[tuple[Any, Any]]:
    """(weight, mask) pairs of every pruned layer."""
    return [
        (weight, mask)
        for layer in wrapped.layers
        for weight, mask, _threshold in getattr(layer, "pruning_vars", ())
    ]


def _prune_once(wrapped: Any, target: float) -> None:
    """Zero the smallest ``target`` share of each pruned weight, as the schedule's last step would."""
    for weight, mask in _pruning_variables(wrapped):
        values = weight.numpy()
        count = int(round(target * values.size))
        keep = np.ones(values.shape, dtype=bool)
        if count:
            magnitudes = np.abs(values).ravel()
            keep.ravel()[np.argpartition(magnitudes, count - 1)[:count]] = False
        weight.assign(values * keep)
        mask.assign(keep.astype(values.dtype))


def _sparsity(wrapped: Any) -> float:
    pairs = _pruning_variables(wrapped)
    if not pairs:
        raise CompressionError("the model has no layer that tensorflow-model-optimization can prune")
    zeros = sum(int(np.sum(weight.numpy() == 0)) for weight, _ in pairs)
    total = sum(int(np.prod(weight.shape)) for weight, _ in pairs)
    return zeros / total


def _fine_tune(
    tfmot: Any,
    model: Any,
    params: Mapping[str, Any],
    inputs: Sequence[TensorSpec],
    train: Dataset,
    epochs: int,
    progress: ProgressCallback,
) -> tuple[Any, str]:
    steps_per_epoch = math.ceil(train.size / int(params["batch_size"]))
    schedule = _schedule(tfmot, params, epochs, steps_per_epoch)
    wrapped = _wrap(tfmot, model, schedule)
    how = fit(wrapped, model, params, inputs, train, epochs, progress, "fine-tuning the pruned model",
              [tfmot.sparsity.keras.UpdatePruningStep()])
    return wrapped, how


def _schedule(tfmot: Any, params: Mapping[str, Any], epochs: int, steps_per_epoch: int) -> Any:
    """Polynomial decay from 0 to the target that ends on a mask update before the last
    epoch (before the last third of a single epoch), so the weights then fine-tune under
    the final masks."""
    target = float(params["sparsity"])
    begin = int(params["begin_step"])
    frequency = int(params["frequency"])
    total_steps = epochs * steps_per_epoch
    if begin >= total_steps:
        raise CompressionError(
            f"begin_step={begin} is not before the last training step ({total_steps}); "
            "lower it or raise epochs"
        )
    ramp = total_steps - steps_per_epoch if epochs >= 2 else (2 * total_steps) // 3
    end = begin + (max(ramp - begin, 0) // frequency) * frequency
    if end <= begin:
        return tfmot.sparsity.keras.ConstantSparsity(target, begin_step=begin, frequency=frequency)
    return tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=target,
        begin_step=begin,
        end_step=end,
        frequency=frequency,
    )
