"""``distill``: train a smaller student to match the teacher, the handle's torch model,
on ``--train-data``; the student then replaces the model for the following steps.

The student is built by a factory (``student=package.module:function``, imported
like ``model_factory``; it must take the teacher's inputs and give its first
output's shape) or, for a transformers teacher, by ``layers=N``: the teacher's
class and config with N layers, initialised DistilBERT-style from teacher layers
(evenly spaced from the first to the last: 0, 3, 5 of 6 for N = 3; the last alone
for N = 1) and every other weight (embeddings, pooler, head) copied.

The loss (:mod:`compressor_frontends.pytorch.matching`) matches every output of the teacher:

* the output the labels ``y`` belong to (``--set label_output=NAME``, else the
  classifier the labels fit; none: labels unused, the note says so): Hinton's KL
  divergence of the temperature-softened distributions, times T^2, weighted
  ``alpha``, plus ``1 - alpha`` times the cross-entropy on the labels;
* the first output otherwise: the same KL for a classifier (pure teacher matching),
  MSE plus cosine distance per (unpadded) token for hidden states (encoders such as
  MiniLM, whose mean-pooled output is the sentence embedding; DistilBERT's cosine
  loss) and embeddings, MSE over the variance for anything else (a box head);
* further outputs (a detector's boxes beside its scores) by MSE over the variance,
  where the student gives them in the teacher's shape.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compressor.plugin import Context, Dataset, Step, UsageError, import_factory
from compressor_frontends.pytorch.feeding import batches, call_all, input_names
from compressor_frontends.pytorch.matching import LOGITS, Matching, matched_loss, matching
from compressor_frontends.pytorch.model import TorchModel, set_mode
from compressor_frontends.pytorch.techniques import require_transformers

FACTORY_RATE, LAYERS_RATE = 1e-3, 1e-4
NOT_LOGITS = ("embedding", "regression", "detection")


def distill(model: TorchModel, teacher: Any, step: Step, context: Context,
            source: Path) -> tuple[Any, list[str], dict[str, Any]]:
    """The student of ``teacher`` (``model``'s module) trained on the train data (in eval
    mode), notes and metadata. ``source`` names the model in refusals."""
    import torch

    params = step.params
    factory_name, layers = params.get("student"), params.get("layers")
    if (factory_name is None) == (layers is None):
        raise UsageError("distill needs exactly one of student=package.module:function or layers=N")
    dataset = context.train_data
    if dataset is None:
        raise UsageError(f"'{step}' trains the student: pass --train-data")
    input_names(model, dataset)
    factory = import_factory(factory_name, "distill student") if factory_name is not None else None
    set_mode(teacher, False)
    with torch.random.fork_rng():
        torch.manual_seed(context.seed)
        if factory is not None:
            student, picked = build_student(factory, str(factory_name)), None
        else:
            student, picked = layer_student(teacher, int(layers), source, step)
        plan = matching(model, teacher, student, dataset, context, step)
        rate = float(params.get("learning_rate") or (FACTORY_RATE if factory is not None else LAYERS_RATE))
        started = time.perf_counter()
        losses = train(model, teacher, student, dataset, params, plan, rate, context)
    set_mode(student, False)
    before, after = parameters(teacher), parameters(student)
    loss = plan.describe("" if float(params["alpha"]) < 1 else " (alpha=1: labels unused)")
    if dataset.labels is None and plan.first == LOGITS:
        loss += ", no labels"
    origin = f"layers {picked} of the teacher" if picked is not None else f"student={factory_name}"
    note = (f"distilled into {origin}: {after:,} parameters ({after / max(before, 1):.0%} of the teacher's "
            f"{before:,}), {params['epochs']} epoch(s) on {dataset.size} examples of {dataset.path.name}, "
            f"{loss}; loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    notes = [note, plan.labels.note] if plan.labels.note else [note]
    metadata = {"distillation": {
        "student": str(factory_name) if factory_name is not None else f"layers={layers}",
        "teacher_layers_copied": picked, "teacher_parameters": before, "student_parameters": after,
        "loss": loss, "label_output": plan.labels.name,
        "epoch_losses": [round(value, 6) for value in losses], "learning_rate": rate,
        "seconds": round(time.perf_counter() - started, 3),
    }}
    return student, notes, metadata


def build_student(factory: Any, name: str) -> Any:
    import torch

    student = factory()
    if not isinstance(student, torch.nn.Module):
        raise UsageError(f"distill student {name!r} returned {type(student).__name__}, not an nn.Module")
    return student


def layer_student(teacher: Any, layers: int, source: Path, step: Step) -> tuple[Any, list[int]]:
    """The teacher's class with ``layers`` of its layers (every k-th), other weights copied."""
    import torch

    require_transformers(step, teacher, source)
    total = int(getattr(teacher.config, "num_hidden_layers", 0) or 0)
    stacks = [(name, module) for name, module in teacher.named_modules()
              if isinstance(module, torch.nn.ModuleList) and len(module) == total]
    if not stacks:
        raise UsageError(f"'{step}': found no stack of {total} layers in {type(teacher).__name__}")
    if layers >= total:
        raise UsageError(f"'{step}': the teacher has {total} layers; layers= must be fewer")
    picked = spread(total, layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    student = type(teacher)(config)
    name, stack = stacks[0]
    prefix = f"{name}."
    shared = {key: value for key, value in teacher.state_dict().items() if not key.startswith(prefix)}
    result = student.load_state_dict(shared, strict=False)
    if result.unexpected_keys or any(not key.startswith(prefix) for key in result.missing_keys):
        raise UsageError(f"'{step}': the {layers}-layer {type(teacher).__name__} does not take the "
                         "teacher's other weights")
    target = student.get_submodule(name)
    for position, index in enumerate(picked):
        target[position].load_state_dict(stack[index].state_dict())
    return student, picked


def spread(total: int, count: int) -> list[int]:
    """``count`` of ``total`` layers evenly spaced from the first to the last (the top layer
    shapes the output most: all-MiniLM-L6-v2 from layers 0, 3, 5 gave 0.63 mean-pooled cosine
    to the teacher before training, from DistilBERT's every other layer, 0, 2, 4: 0.32)."""
    if count == 1:
        return [total - 1]
    return [int(index * (total - 1) / (count - 1) + 0.5) for index in range(count)]


def parameters(module: Any) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


#: The loss of one batch: (inputs by name, labels or None, the student's outputs, named,
#: the first first) -> loss.
LossOf = Callable[[dict[str, Any], Any, list[tuple[str, Any]]], Any]


def train(model: TorchModel, teacher: Any, student: Any, dataset: Dataset, params: dict[str, Any],
          plan: Matching, rate: float, context: Context, after_step: Callable[[], None] | None = None,
          stage: str = "distilling") -> list[float]:
    """AdamW on the distillation loss (:func:`compressor_frontends.pytorch.matching.matched_loss`); the
    mean loss of each epoch. ``after_step`` runs after every optimizer step (fine-tuning
    keeps pruned weights at zero with it)."""
    import torch

    temperature, alpha = float(params["temperature"]), float(params["alpha"])

    def loss_of(batch: dict[str, Any], labels: Any, outputs: list[tuple[str, Any]]) -> Any:
        with torch.no_grad():
            targets = call_all(model, teacher, batch)
        return matched_loss(plan, outputs, targets, labels, temperature, alpha, batch.get("attention_mask"))

    return train_loop(model, student, dataset, params, rate, context, loss_of, after_step, stage)


def train_loop(model: TorchModel, student: Any, dataset: Dataset, params: dict[str, Any], rate: float,
               context: Context, loss_of: LossOf, after_step: Callable[[], None] | None = None,
               stage: str = "training") -> list[float]:
    """AdamW on ``loss_of`` over shuffled batches of ``dataset`` (``params``: epochs and
    batch_size); the mean loss of each epoch."""
    import numpy as np
    import torch

    optimizer = torch.optim.AdamW(student.parameters(), lr=rate)
    rng = np.random.default_rng(context.seed)
    epochs, size = int(params["epochs"]), int(params["batch_size"])
    steps_per_epoch = -(-dataset.size // size)
    set_mode(student, True)
    losses = []
    for epoch in range(epochs):
        total = 0.0
        for number, (batch, labels) in enumerate(batches(model, dataset, size, rng.permutation(dataset.size))):
            outputs = call_all(model, student, batch)
            loss = loss_of(batch, labels, outputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.item() * len(outputs[0][1])
            context.progress(stage, (epoch * steps_per_epoch + number + 1) / (epochs * steps_per_epoch))
        losses.append(total / dataset.size)
    return losses
