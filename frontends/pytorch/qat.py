"""``qat``'s training: a torch model trained with fake-quantized layers, ready for an
export that writes each fake quantization as QuantizeLinear + DequantizeLinear.

Every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` is wrapped so that it computes
with fake-quantized tensors, the layout ONNX Runtime's own static ``quantize int8``
writes: weights int8, symmetric, one scale per output channel (max |w| / 127,
recomputed at every step); the layer's input and output int8 per tensor,
asymmetric, over a range first measured on the train data, then followed by an
exponential moving average of each batch's min and max. The model is trained
with AdamW on the task loss (cross-entropy on labels ``y`` through the output they
belong to, :mod:`compressor_frontends.pytorch.matching`; every other output, and all
of them without labels, matched to the float model's as ``distill`` does). Then the
scales are frozen as constants for the export (the onnx backend folds the weights'
QuantizeLinear into int8 initializers). Transformers models work the same way on
their Linear layers; attention's own matmuls, embeddings and normalizations stay float.

A model with at least ``SPARSE`` zeros in its weights (a pruned one) keeps them
through training.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import Context, Dataset, Step, UsageError
from compressor_frontends.pytorch.distill import train_loop
from compressor_frontends.pytorch.feeding import batches, call, call_all, input_names
from compressor_frontends.pytorch.matching import (
    LOGITS,
    Matching,
    labelled_loss,
    matched_loss,
    matching,
)
from compressor_frontends.pytorch.model import TorchModel, set_mode

#: Examples whose activations set the first quantization ranges.
RANGE_EXAMPLES = 256
#: Weight of each training batch in the moving min/max of activation ranges.
RANGE_MOMENTUM = 0.01
INT8_MIN, INT8_MAX = -128, 127
#: From this share of zeros in its Linear/Conv weights (a pruned model) the zeros are kept
#: through training, as the tflite backend's prune-preserving QAT does.
SPARSE = 0.2


@dataclass
class QatTraining:
    """A model trained by :func:`train_fake_quantized`, and how the training went."""

    #: The trained copy, its layers fake-quantized with frozen scales, in eval mode.
    student: Any
    layers: int
    plan: Matching
    losses: list[float]
    rate: float
    seconds: float
    #: The share of zeros in the weights before training, and after (None: zeros not kept).
    sparsity_before: float
    sparsity_after: float | None


def train_fake_quantized(model: TorchModel, original: Any, step: Step, context: Context,
                         source: Path) -> QatTraining:
    """A copy of ``original`` (``model``'s module) trained with fake quantization on the
    train data. ``source`` names the model in refusals."""
    import torch

    dataset = context.train_data
    if dataset is None:
        raise UsageError(f"'{step}' trains the model: pass --train-data")
    input_names(model, dataset)
    if isinstance(original, torch.jit.ScriptModule):
        raise UsageError(f"'{step}' cannot train a TorchScript model; give its state_dict and model_factory")
    set_mode(original, False)
    student = copy.deepcopy(original)
    layers = wrap_layers(student)
    if not layers:
        raise UsageError(f"'{step}': {source.name} has no nn.Linear or nn.Conv1d/2d layer to quantize")
    weights = [layer.layer.weight for layer in layers]
    before = sparsity(weights)
    masks = [(weight, weight.detach() != 0) for weight in weights] if before >= SPARSE else []
    params = step.params
    rate = float(params["learning_rate"])
    started = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(context.seed)
        plan = matching(model, original, student, dataset, context, step)
        observe_ranges(model, student, dataset, layers)
        losses = train(model, original, student, dataset, params, plan, rate, context, masks)
    for layer in layers:
        layer.freeze()
    seconds = time.perf_counter() - started
    return QatTraining(student, len(layers), plan, losses, rate, seconds, before,
                       sparsity(weights) if masks else None)


def qat_report(training: QatTraining, step: Step, dataset: Dataset, carried: int) -> tuple[list[str], dict[str, Any]]:
    """The notes and the ``qat`` facts of a model exported as QDQ int8 after ``training``;
    ``carried``: how many weights came from an edited graph."""
    params, plan, losses = step.params, training.plan, training.losses
    labelled = plan.labelled is not None
    if labelled and len(plan.names) == 1:
        how = "cross-entropy on the labels"
    elif labelled:
        how = (f"cross-entropy on the labels through {plan.labels.name}, the float model's other outputs "
               "matched")
    elif len(plan.names) > 1:
        how = "the float model's outputs" + (" (no labels y)" if dataset.labels is None else "")
    else:
        how = ("the float model's outputs" + (" (no labels y)" if dataset.labels is None else "")
               if plan.first == LOGITS else "the float model's hidden states")
    note = (f"quantization-aware training: {params['epochs']} epoch(s) on {dataset.size} examples of "
            f"{dataset.path.name} against {how}, loss {losses[0]:.4g} -> {losses[-1]:.4g}; exported as QDQ "
            f"int8 ({training.layers} layers: int8 per-channel weights, int8 activations)")
    facts: dict[str, Any] = {
        "epochs": int(params["epochs"]), "labels": labelled, "label_output": plan.labels.name,
        "layers": training.layers,
        "epoch_losses": [round(value, 6) for value in losses], "learning_rate": training.rate,
        "seconds": round(training.seconds, 3)}
    if carried:
        note += f"; started from the {carried} weights of the edited graph"
        facts["weights_from_graph"] = carried
    if training.sparsity_after is not None:
        before, after = training.sparsity_before, training.sparsity_after
        note += f"; zeros kept through training: {before:.1%} -> {after:.1%} of the weights"
        facts.update(sparsity_before=round(before, 4), sparsity_after=round(after, 4))
    return ([note, plan.labels.note] if plan.labels.note else [note]), facts


def sparsity(weights: list[Any]) -> float:
    """The share of exact zeros in ``weights``."""
    total = sum(weight.numel() for weight in weights)
    return sum(int((weight == 0).sum()) for weight in weights) / total if total else 0.0


def wrap_layers(module: Any) -> list[Any]:
    """Replace the Linear and Conv1d/2d layers of ``module`` in place by fake-quantized
    ones; the wrappers, in module order."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    targets = [(name, layer) for name, layer in module.named_modules() if isinstance(layer, kinds)]
    wrapped = []
    for name, layer in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        wrapper = fake_quantized(layer)
        setattr(parent, attribute, wrapper)
        wrapped.append(wrapper)
    return wrapped


def fake_quantized(layer: Any) -> Any:
    """``layer`` computing with int8-rounded weights, input and output."""
    import torch

    class FakeQuantized(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer
            channels = layer.weight.shape[0]
            self.register_buffer("weight_scale", torch.ones(channels))
            self.register_buffer("weight_zero_point", torch.zeros(channels, dtype=torch.int32))
            # Rows: input, output; columns: min, max. Empty until measured.
            self.register_buffer("ranges", torch.zeros(2, 2))
            self.observing, self.observed, self.frozen = False, False, False

        def forward(self, inputs: Any) -> Any:
            weight = self.layer.weight
            scale = self.weight_scale if self.frozen else channel_scales(weight)
            weight = torch.fake_quantize_per_channel_affine(weight, scale, self.weight_zero_point, 0, INT8_MIN,
                                                            INT8_MAX)
            inputs = self._activation(inputs, 0)
            if isinstance(self.layer, torch.nn.Linear):
                outputs = torch.nn.functional.linear(inputs, weight, self.layer.bias)
            else:
                outputs = self.layer._conv_forward(inputs, weight, self.layer.bias)
            return self._activation(outputs, 1)

        def _activation(self, tensor: Any, row: int) -> Any:
            if self.observing:
                bounds = torch.stack([tensor.detach().min(), tensor.detach().max()])
                if self.observed:
                    bounds = torch.stack([bounds[0].minimum(self.ranges[row, 0]), bounds[1].maximum(self.ranges[row, 1])])
                self.ranges[row] = bounds
                return tensor
            if self.training and not self.frozen:
                with torch.no_grad():
                    bounds = torch.stack([tensor.min(), tensor.max()])
                    self.ranges[row] += RANGE_MOMENTUM * (bounds - self.ranges[row])
            scale, zero_point = self.frozen_ranges[row] if self.frozen else activation_parameters(self.ranges[row])
            return torch.fake_quantize_per_tensor_affine(tensor, scale, zero_point, INT8_MIN, INT8_MAX)

        def freeze(self) -> None:
            """Fix the weight scales as constants for the export."""
            self.weight_scale = channel_scales(self.layer.weight)
            # Plain tensors, so the exporter writes them as constants, not as the arithmetic that made them.
            self.frozen_ranges = [activation_parameters(bounds) for bounds in self.ranges]
            self.frozen = True

    return FakeQuantized()


def channel_scales(weight: Any) -> Any:
    """Symmetric int8 scales of ``weight``, one per output channel (its first axis)."""
    return (weight.detach().abs().amax(dim=tuple(range(1, weight.ndim))) / 127).clamp_min(1e-8)


def activation_parameters(bounds: Any) -> tuple[Any, Any]:
    """Scale (float) and zero point (int32) of asymmetric int8 over ``bounds`` (min, max),
    widened to hold 0 as ONNX Runtime's calibration does."""
    import torch

    low, high = bounds[0].clamp(max=0), bounds[1].clamp(min=0)
    scale = ((high - low) / (INT8_MAX - INT8_MIN)).clamp_min(1e-8)
    zero_point = (INT8_MIN - torch.round(low / scale)).clamp(INT8_MIN, INT8_MAX).to(torch.int32)
    return scale.reshape(()), zero_point.reshape(())


def observe_ranges(model: TorchModel, student: Any, dataset: Dataset, layers: list[Any]) -> None:
    """Each layer's input and output min/max over the first examples, as a start."""
    import torch

    for layer in layers:
        layer.observing = True
    set_mode(student, False)
    try:
        with torch.no_grad():
            for batch, _ in batches(model, dataset, 32, range(min(dataset.size, RANGE_EXAMPLES))):
                call(model, student, batch)
                for layer in layers:
                    layer.observed = True
    finally:
        for layer in layers:
            layer.observing = False


def train(model: TorchModel, original: Any, student: Any, dataset: Dataset, params: dict[str, Any],
          plan: Matching, rate: float, context: Context, masks: list[tuple[Any, Any]]) -> list[float]:
    """AdamW on the task loss through the fake quantization, ``masks`` (weight, where it may be
    nonzero) applied after every step; the mean loss of each epoch."""
    import torch

    def loss_of(batch: dict[str, Any], labels: Any, outputs: list[tuple[str, Any]]) -> Any:
        if plan.labelled is not None and labels is not None and len(outputs) == 1:
            # The labels alone train a single output: no need to run the float model.
            return labelled_loss(plan, outputs[0][1], outputs[0][1].detach(), labels, 1.0, 0.0)
        with torch.no_grad():
            targets = call_all(model, original, batch)
        # alpha 0: the labelled output on its labels alone; the others matched at T = 1.
        return matched_loss(plan, outputs, targets, labels, 1.0, 0.0, batch.get("attention_mask"))

    def keep_zeros() -> None:
        with torch.no_grad():
            for weight, mask in masks:
                weight.mul_(mask)

    losses = train_loop(model, student, dataset, params, rate, context, loss_of, keep_zeros,
                        "quantization-aware training")
    set_mode(student, False)
    return losses
