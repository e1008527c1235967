"""How each output of a torch model is trained in ``distill``, fine-tuning and ``qat``.

The labels ``y`` of the train data train one output only, the one they belong to
(``--set label_output=NAME``, else inferred: :func:`compressor.training_labels.label_output`):
cross-entropy there (binary for one score per example), mixed with the KL to the
teacher's softened logits by ``alpha``. Every other output is matched to the
original model's:

* the first output, unless the labels train it: ``logits`` (a classifier: KL on the
  softened logits), ``hidden`` (hidden states, embeddings: MSE plus cosine distance
  per unpadded token) or ``values`` (anything else, a detector's ``[N, 4]`` boxes:
  mean squared error over the original output's variance). Of several outputs, a
  first one that only its shape calls a classifier is matched by ``values`` too:
  ``[N, 4]`` boxes look like four class scores, and the KL would leave each row's
  offset free;
* every further output (a second head, boxes beside scores) by ``values``, where the
  student gives it in the original's shape.

So a detector whose output 0 is its box head is no longer trained with
cross-entropy on its boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from compressor.plugin import (
    Context,
    Dataset,
    LabelOutput,
    Step,
    TensorSpec,
    UsageError,
    declared_task,
    detect_task,
    label_output,
    probe_rows,
)
from compressor_frontends.pytorch.feeding import batches, call_all, input_names
from compressor_frontends.pytorch.model import TorchModel, set_mode

LOGITS, HIDDEN, VALUES = "logits", "hidden", "values"


@dataclass(frozen=True)
class Matching:
    """``first``: how the first output is matched when the labels do not train it
    (``logits``, ``hidden`` or ``values``); ``labels``: the output the labels train."""

    names: tuple[str, ...]
    first: str
    labels: LabelOutput
    #: The labelled output has one score per example (binary cross-entropy on it) ...
    binary: bool = False
    #: ... and it is a probability, not a logit.
    probabilities: bool = False

    @property
    def labelled(self) -> int | None:
        return self.labels.index

    def describe(self, labels_weight: str = "") -> str:
        """The loss in words: ``KL on softened logits + cross-entropy on labels``;
        ``labels_weight`` replaces `` + cross-entropy on labels`` (``alpha=1``)."""
        texts = {LOGITS: "KL on softened logits", HIDDEN: "MSE + cosine on hidden states",
                 VALUES: "MSE over the variance"}
        if self.binary:
            labelled = f"MSE over the variance{labels_weight or ' + binary cross-entropy on labels'}"
        else:
            labelled = f"KL on softened logits{labels_weight or ' + cross-entropy on labels'}"
        first = labelled if self.labelled == 0 else texts[self.first]
        if len(self.names) == 1:
            return first
        parts = [f"{first} on {self.names[0]}"]
        if self.labelled not in (None, 0):
            parts.append(f"{labelled} on {self.names[self.labelled]}")
        others = [name for index, name in enumerate(self.names) if index not in (0, self.labelled)]
        if others:
            parts.append(f"MSE over the variance on {', '.join(others)}")
        return "; ".join(parts)


def matching(model: TorchModel, teacher: Any, student: Any, dataset: Dataset, context: Context,
             step: Step) -> Matching:
    """How ``student`` is trained against ``teacher`` on ``dataset``; refuses a student
    whose first output (or labelled output) does not have the teacher's shape."""
    import torch

    rows = probe_rows(dataset.size)
    batch, _ = next(batches(model, dataset, len(rows), rows))
    set_mode(student, False)
    with torch.no_grad():
        expected = call_all(model, teacher, batch)
        try:
            got = call_all(model, student, batch)
        except Exception as error:  # noqa: BLE001 - the student's own code raises anything
            raise UsageError(f"'{step}': the student fails on the teacher's inputs "
                             f"({type(error).__name__}: {str(error).strip()[:160]})") from None
    _same_shape(got, expected, 0, step)
    names = tuple(model.output_names) if len(model.output_names) == len(expected) else tuple(
        name for name, _ in expected)
    values = [(tensor.detach().cpu().float() if tensor.is_floating_point() else tensor.detach().cpu()).numpy()
              for _, tensor in expected]
    inputs = [TensorSpec(name, tuple(batch[name].shape), str(batch[name].dtype).removeprefix("torch."))
              for name in input_names(model, dataset) if name in batch]
    labels = label_output(names, values, inputs, context.options, dataset, rows)
    if labels.index is not None:
        _same_shape(got, expected, labels.index, step)
    first = values[0]
    task, _ = detect_task(TensorSpec(names[0], tuple(first.shape), first.dtype.name), first, inputs, context.options, 0)
    if expected[0][0] == "logits":
        kind = LOGITS
    elif expected[0][0] == "last_hidden_state" or first.ndim > 2 or task == "embedding":
        kind = HIDDEN
    elif first.ndim == 2 and first.shape[-1] >= 2 and task == "classifier" and (
            len(names) == 1 or labels.index == 0 or declared_task(names[0], context.options)):
        kind = LOGITS
    else:
        # One number per example, or (among several outputs) a 2-D first one that is a
        # classifier by its shape only (a detector's [N, 4] boxes look the same): matched
        # value for value, which suits both.
        kind = VALUES
    labelled = values[labels.index] if labels.index is not None else None
    binary = bool(labelled is not None and labelled.size and (labelled.ndim == 1 or labelled.shape[-1] == 1))
    probabilities = bool(binary and labelled.min() >= 0 and labelled.max() <= 1)
    return Matching(names, kind, labels, binary, probabilities)


def _same_shape(got: Sequence[tuple[str, Any]], expected: Sequence[tuple[str, Any]], index: int,
                step: Step) -> None:
    name, wanted = expected[index]
    found = tuple(got[index][1].shape) if index < len(got) else None
    if found != tuple(wanted.shape):
        what = "output" if index == 0 else f"output {index} (the one the labels y train)"
        shown = "none" if found is None else _shape(found)
        raise UsageError(f"'{step}': the student's {what} has shape {shown}, the teacher's {name} "
                         f"{_shape(tuple(wanted.shape))}")


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(["N", *map(str, shape[1:])]) + "]" if shape else "[]"


def matched_loss(plan: Matching, outputs: Sequence[tuple[str, Any]], targets: Sequence[tuple[str, Any]],
                 labels: Any, temperature: float, alpha: float, mask: Any = None) -> Any:
    """The loss of one batch: the student's ``outputs`` against the teacher's ``targets``
    and ``labels`` (or None) as :class:`Matching` says; ``alpha`` weighs the teacher
    against the labels on the labelled output (0: the labels alone)."""
    loss: Any = 0.0
    for index, ((_, output), (_, target)) in enumerate(zip(outputs, targets)):
        if index == plan.labelled and labels is not None:
            loss = loss + labelled_loss(plan, output, target, labels, temperature, alpha)
        elif index == 0:
            loss = loss + (logits_loss(output, target, None, temperature, 1.0) if plan.first == LOGITS
                           else hidden_loss(output, target, mask) if plan.first == HIDDEN
                           else values_loss(output, target))
        elif output.shape == target.shape and output.is_floating_point() and target.numel() > 1:
            loss = loss + values_loss(output, target)
    return loss


def labelled_loss(plan: Matching, output: Any, target: Any, labels: Any, temperature: float, alpha: float) -> Any:
    """The labelled output's loss: KL to the teacher weighted ``alpha`` plus ``1 - alpha``
    cross-entropy on ``labels`` (binary for one score per example)."""
    import torch.nn.functional as functional

    if not plan.binary:
        return logits_loss(output, target, labels, temperature, alpha)
    scores = output.reshape(-1)
    if len(scores) != len(labels):
        return values_loss(output, target)
    truth = labels.to(scores.dtype)
    hard = (functional.binary_cross_entropy(scores.clamp(1e-7, 1 - 1e-7), truth) if plan.probabilities
            else functional.binary_cross_entropy_with_logits(scores, truth))
    return hard if alpha == 0 else alpha * values_loss(output, target) + (1 - alpha) * hard


def values_loss(output: Any, target: Any) -> Any:
    """Mean squared error over the target's variance, so each output weighs about as
    much whatever its scale."""
    return ((output - target) ** 2).mean() / (target.var(unbiased=False) + 1e-6)


def logits_loss(output: Any, target: Any, labels: Any, temperature: float, alpha: float) -> Any:
    import torch.nn.functional as functional

    classes = output.shape[-1]
    student, teacher = output.reshape(-1, classes), target.reshape(-1, classes)
    soft = functional.kl_div(functional.log_softmax(student / temperature, dim=-1),
                             functional.log_softmax(teacher / temperature, dim=-1),
                             reduction="batchmean", log_target=True) * temperature ** 2
    if labels is None or len(labels) != len(student) or alpha == 1:
        return soft
    hard = functional.cross_entropy(student, labels)
    return hard if alpha == 0 else alpha * soft + (1 - alpha) * hard


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
