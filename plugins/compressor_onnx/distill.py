"""``distill``: train a smaller student to match the teacher, the handle's torch model,
on ``--train-data``; the student then replaces the model for the following steps.

The student is built by a factory (``student=package.module:function``, imported
like ``model_factory``; it must take the teacher's inputs and give its first
output's shape) or, for a transformers teacher, by ``layers=N``: the teacher's
class and config with N layers, initialised DistilBERT-style from teacher layers
(evenly spaced from the first to the last: 0, 3, 5 of 6 for N = 3; the last alone
for N = 1) and every other weight (embeddings, pooler, head) copied.

The loss matches the teacher's first output:

* ``logits`` (classifiers, language models; a plain module's 2-D output unless
  ``--set task.NAME`` says embedding or regression): Hinton's KL divergence of the
  temperature-softened distributions, times T^2, weighted ``alpha``; plus
  ``1 - alpha`` times the cross-entropy on the labels ``y`` when the train data
  has them. Without labels it is pure teacher matching.
* hidden states (encoders such as MiniLM, whose mean-pooled output is the
  sentence embedding): MSE plus cosine distance per (unpadded) token, as
  DistilBERT's cosine loss on hidden states; labels are not used.

Further outputs (a detector's boxes beside its scores) are matched too where the
student gives them in the teacher's shape (:func:`other_outputs_loss`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from compressor import Context, Dataset, Model, Step, UsageError
from compressor.factories import import_factory
from compressor_onnx.heads import (
    batches,
    call,
    call_all,
    check_torch,
    input_names,
    is_transformers,
    set_mode,
    torch_model,
    with_module,
)
from compressor_onnx.loading import Network

FACTORY_RATE, LAYERS_RATE = 1e-3, 1e-4
NOT_LOGITS = ("embedding", "regression", "detection")


def distill(model: Model, step: Step, context: Context) -> tuple[Network, list[str], dict[str, Any]]:
    """The student trained on the train data: the new Network, notes and metadata."""
    import torch

    params = step.params
    factory_name, layers = params.get("student"), params.get("layers")
    if (factory_name is None) == (layers is None):
        raise UsageError("distill needs exactly one of student=package.module:function or layers=N")
    dataset = context.train_data
    if dataset is None:
        raise UsageError(f"'{step}' trains the student: pass --train-data")
    input_names(check_torch(model, step), dataset)
    factory = import_factory(factory_name, "distill student") if factory_name is not None else None
    network, teacher, _ = torch_model(model, step, context)
    set_mode(teacher, False)
    with torch.random.fork_rng():
        torch.manual_seed(context.seed)
        if factory is not None:
            student, picked = build_student(factory, str(factory_name)), None
        else:
            student, picked = layer_student(teacher, int(layers), model, step)
        kind = output_kind(network, teacher, student, dataset, context, step)
        rate = float(params.get("learning_rate") or (FACTORY_RATE if factory is not None else LAYERS_RATE))
        started = time.perf_counter()
        losses = train(network, teacher, student, dataset, params, kind, rate, context)
    set_mode(student, False)
    before, after = parameters(teacher), parameters(student)
    if kind != "logits":
        loss = "MSE + cosine on hidden states"
    elif dataset.labels is None:
        loss = "KL on softened logits, no labels"
    else:
        loss = "KL on softened logits" + (" + cross-entropy on labels" if float(params["alpha"]) < 1
                                          else " (alpha=1: labels unused)")
    origin = f"layers {picked} of the teacher" if picked is not None else f"student={factory_name}"
    note = (f"distilled into {origin}: {after:,} parameters ({after / max(before, 1):.0%} of the teacher's "
            f"{before:,}), {params['epochs']} epoch(s) on {dataset.size} examples of {dataset.path.name}, "
            f"{loss}; loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    metadata = {"distillation": {
        "student": str(factory_name) if factory_name is not None else f"layers={layers}",
        "teacher_layers_copied": picked, "teacher_parameters": before, "student_parameters": after,
        "loss": loss, "epoch_losses": [round(value, 6) for value in losses], "learning_rate": rate,
        "seconds": round(time.perf_counter() - started, 3),
    }}
    return with_module(network, student), [note], metadata


def build_student(factory: Any, name: str) -> Any:
    import torch

    student = factory()
    if not isinstance(student, torch.nn.Module):
        raise UsageError(f"distill student {name!r} returned {type(student).__name__}, not an nn.Module")
    return student


def layer_student(teacher: Any, layers: int, model: Model, step: Step) -> tuple[Any, list[int]]:
    """The teacher's class with ``layers`` of its layers (every k-th), other weights copied."""
    import torch

    if not is_transformers(teacher):
        raise UsageError(f"'{step}': layers= needs a transformers teacher; {model.source.name} is a plain "
                         "torch model (give student=package.module:function)")
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


def output_kind(network: Network, teacher: Any, student: Any, dataset: Dataset, context: Context,
                step: Step) -> str:
    """``logits`` or ``hidden``: how the outputs are matched; refuses a student whose
    first output does not have the teacher's shape."""
    import torch

    batch, _ = next(batches(network, dataset, min(2, dataset.size)))
    set_mode(student, False)
    with torch.no_grad():
        name, expected = call(network, teacher, batch)
        try:
            _, got = call(network, student, batch)
        except Exception as error:  # noqa: BLE001 - the student's own code raises anything
            raise UsageError(f"'{step}': the student fails on the teacher's inputs "
                             f"({type(error).__name__}: {str(error).strip()[:160]})") from None
    if tuple(got.shape) != tuple(expected.shape):
        raise UsageError(f"'{step}': the student's output has shape {tuple(got.shape)}, the teacher's "
                         f"{name} {tuple(expected.shape)}")
    if name == "logits":
        kind = "logits"
    elif name == "last_hidden_state" or expected.ndim != 2 or expected.shape[-1] < 2:
        kind = "hidden"
    else:
        kind = "hidden" if context.options.get(f"task.{name}") in NOT_LOGITS else "logits"
    labels = dataset.labels
    if kind == "logits" and labels is not None and len(labels) and int(labels.max()) >= expected.shape[-1]:
        raise UsageError(f"'{step}': the train data has label {int(labels.max())}, the model "
                         f"{expected.shape[-1]} classes", dataset.path)
    return kind


#: The loss of one batch: (inputs by name, labels or None, the student's outputs, named,
#: the first first) -> loss.
LossOf = Callable[[dict[str, Any], Any, list[tuple[str, Any]]], Any]


def train(network: Network, teacher: Any, student: Any, dataset: Dataset, params: dict[str, Any],
          kind: str, rate: float, context: Context, after_step: Callable[[], None] | None = None,
          stage: str = "distilling") -> list[float]:
    """AdamW on the distillation loss; the mean loss of each epoch. ``after_step`` runs
    after every optimizer step (fine-tuning keeps pruned weights at zero with it)."""
    import torch

    temperature, alpha = float(params["temperature"]), float(params["alpha"])

    def loss_of(batch: dict[str, Any], labels: Any, outputs: list[tuple[str, Any]]) -> Any:
        with torch.no_grad():
            targets = call_all(network, teacher, batch)
        output, target = outputs[0][1], targets[0][1]
        if kind == "logits":
            loss = logits_loss(output, target, labels, temperature, alpha)
        else:
            loss = hidden_loss(output, target, batch.get("attention_mask"))
        return loss + other_outputs_loss(outputs, targets)

    return train_loop(network, student, dataset, params, rate, context, loss_of, after_step, stage)


def train_loop(network: Network, student: Any, dataset: Dataset, params: dict[str, Any], rate: float,
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
        for number, (batch, labels) in enumerate(batches(network, dataset, size, rng.permutation(dataset.size))):
            outputs = call_all(network, student, batch)
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


def other_outputs_loss(outputs: list[tuple[str, Any]], targets: list[tuple[str, Any]]) -> Any:
    """The outputs after the first (a detector's boxes beside its scores, a second head)
    matched to the teacher's by mean squared error over the target's variance, so each
    weighs about as much whatever its scale; 0 for a single-output model. Outputs of
    another shape (a student with fewer or other outputs) or not floating point are left out."""
    loss: Any = 0.0
    for (_, output), (_, target) in zip(outputs[1:], targets[1:]):
        if output.shape == target.shape and output.is_floating_point() and target.numel() > 1:
            loss = loss + ((output - target) ** 2).mean() / (target.var(unbiased=False) + 1e-6)
    return loss


def logits_loss(output: Any, target: Any, labels: Any, temperature: float, alpha: float) -> Any:
    import torch.nn.functional as functional

    classes = output.shape[-1]
    student, teacher = output.reshape(-1, classes), target.reshape(-1, classes)
    soft = functional.kl_div(functional.log_softmax(student / temperature, dim=-1),
                             functional.log_softmax(teacher / temperature, dim=-1),
                             reduction="batchmean", log_target=True) * temperature ** 2
    if labels is None or len(labels) != len(student) or alpha == 1:
        return soft
    return alpha * soft + (1 - alpha) * functional.cross_entropy(student, labels)


def hidden_loss(output: Any, target: Any, mask: Any) -> Any:
    import torch.nn.functional as functional

    if output.ndim != 3 or mask is None or mask.shape != output.shape[:2]:
        return functional.mse_loss(output, target) + (
            1 - functional.cosine_similarity(output.flatten(1), target.flatten(1), dim=-1)).mean()
    weights = mask.to(output.dtype)
    count = weights.sum().clamp_min(1)
    squared = ((output - target) ** 2).mean(dim=-1)
    distance = 1 - functional.cosine_similarity(output, target, dim=-1)
    return ((squared + distance) * weights).sum() / count
