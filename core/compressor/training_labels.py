"""Which output of a model the labels ``y`` of a training file train.

Fine-tuning, distillation and QAT train on the labels only through that output
(cross-entropy); every other output is matched to the original model's. The output
is the one named by ``--set label_output=NAME``, else:

* one output: itself, when :func:`compressor.tasks.detect` calls it a classifier
  (or a probability, language model or sequence tagger); a label past its classes is
  refused;
* several outputs: the one :func:`compressor.tasks.label_output` infers (the output
  accuracy is measured on), if the original model's top-1 on it agrees with the
  labels on the training examples far more often than the commonest label's share
  (at least halfway from that share to 100%); else the output of class scores the
  labels fit that agrees with them most, past the same bar. Shape alone cannot tell
  a detector's ``[N, 4]`` box head at output 0 from a classifier of 4 classes; its
  argmax agrees with the labels by chance only. With no such output the labels are
  left unused and the note says how to name one.

Framework-free: the caller gives the original model's outputs on a few training
examples (:func:`probe_rows`) as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from compressor.errors import UsageError
from compressor.models import Dataset, TensorSpec

OPTION = "label_output"
#: Training examples the outputs are read on to choose.
PROBED_EXAMPLES = 64
#: Tasks of a single output whose last axis holds class scores the labels can train.
_CLASS_SCORES = ("classifier", "probability", "language-model", "sequence")


@dataclass(frozen=True)
class LabelOutput:
    """The output the labels train (``index`` into the outputs, None: labels unused), why,
    and what the report says about it (empty when there is nothing to say)."""

    index: int | None
    name: str | None
    note: str
    why: str = ""


def probe_rows(size: int, count: int = PROBED_EXAMPLES) -> Any:
    """Up to ``count`` example indices spread over a file of ``size`` (labels sorted by
    class still show each output's agreement with them)."""
    import numpy as np

    return np.unique(np.linspace(0, size - 1, min(count, size)).astype(np.int64))


def class_count(values: Any) -> int | None:
    """C of float class scores ``[N, C]`` (class axis last), 2 for one score per example
    (``[N]``, ``[N, 1]``: a binary classifier); None for other outputs."""
    if values.dtype.kind != "f" or values.ndim > 2:
        return None
    return int(values.shape[1]) if values.ndim == 2 and values.shape[1] >= 2 else 2


def integer_labels(labels: Any) -> bool:
    """Whether ``labels`` are class indices (integers >= 0), not regression targets."""
    import numpy as np

    labels = np.asarray(labels)
    if labels.size == 0 or labels.dtype.kind not in "iuf":
        return False
    return bool(np.all(labels >= 0) and np.all(np.floor(labels) == labels))


def agreement(values: Any, labels: Any) -> float:
    """The share of examples whose top-1 class in ``values`` (class scores ``[N, C]``, or
    one score per example: a probability over 0.5, a logit over 0) is their label."""
    import numpy as np

    if values.ndim == 2 and values.shape[1] >= 2:
        top1 = values.argmax(axis=1)
    else:
        scores = values.reshape(len(values))
        top1 = (scores > (0.5 if scores.min() >= 0 and scores.max() <= 1 else 0.0)).astype(np.int64)
    return float((top1 == labels).mean()) if len(labels) else 0.0


def label_output(names: Sequence[str], values: Sequence[Any], inputs: Sequence[TensorSpec],
                 options: Mapping[str, Any], train: Dataset, rows: Sequence[int]) -> LabelOutput:
    """The output the labels of ``train`` train, of the outputs ``names`` whose values on
    the training examples ``rows`` (batch axis first, numpy) are ``values``; refuses a
    declared ``label_output`` that is no output of class scores the labels fit."""
    import numpy as np

    if train.labels is None:
        return LabelOutput(None, None, "")
    labels = np.asarray(train.labels)
    largest = int(labels.max()) if integer_labels(labels) else None
    declared = options.get(OPTION)
    if declared is not None:
        return _declared(str(declared), names, values, largest, train)
    if largest is None:
        return LabelOutput(None, None, "labels y unused: they are not class indices (integers >= 0)")
    truth = labels[np.asarray(rows)] if labels.ndim == 1 and len(rows) else None
    if len(names) == 1:
        return _single(names[0], values[0], inputs, options, largest, train, truth)
    return _several(names, values, options, labels, largest, truth)


def _single(name: str, value: Any, inputs: Sequence[TensorSpec], options: Mapping[str, Any], largest: int,
            train: Dataset, truth: Any | None) -> LabelOutput:
    from compressor.tasks import chosen_task, detect

    task, why = detect(TensorSpec(name, tuple(value.shape), value.dtype.name), value, inputs, options)
    classes = None
    if task in _CLASS_SCORES and value.dtype.kind == "f":
        classes = value.shape[-1] if value.ndim >= 3 else class_count(value)
    elif (class_count(value) == 2 and largest <= 1 and truth is not None and chosen_task(name, options) is None
          and agreement(value, truth) >= (_commonest(truth) + 1) / 2):
        # One logit per example that the 0/1 labels agree with: a binary classifier, not a regression.
        classes = 2
    if classes is None:
        return LabelOutput(None, None, f"labels y unused: output {name} is no classifier ({task}: {why}); it "
                                       f"is matched to the original's (--set {OPTION}={name} trains it on them)")
    if largest >= classes:
        raise UsageError(f"the train data has label {largest}, the model {classes} classes", train.path)
    return LabelOutput(0, name, "")


def _commonest(truth: Any) -> float:
    """The share of the commonest label: what a constant guess agrees with."""
    import numpy as np

    return float(np.bincount(truth.astype(np.int64)).max() / len(truth))


def _several(names: Sequence[str], values: Sequence[Any], options: Mapping[str, Any], labels: Any, largest: int,
             truth: Any | None) -> LabelOutput:
    from compressor.tasks import chosen_task
    from compressor.tasks import label_output as inferred_output

    inferred = inferred_output(dict(zip(names, values)), options, labels)
    if truth is None:
        return LabelOutput(None, None, f"labels y unused: they are not one class per example; every output is "
                                       f"matched to the original's (--set {OPTION}=NAME trains one on them)")
    chance = _commonest(truth)
    # A classifier of these labels agrees with them far more often than the commonest label's share.
    bar = (chance + 1) / 2
    scores = {name: agreement(value, truth) for name, value in zip(names, values)
              if (class_count(value) or 0) > largest and chosen_task(name, options) in (None, "classifier",
                                                                                          "probability")}
    shown = ", ".join(f"{name} {score:.0%}" for name, score in list(scores.items())[:4])
    evidence = f"top-1 agreement with {len(truth)} training labels: {shown}; the commonest label {chance:.0%}"
    passing = [name for name in scores if scores[name] >= bar]
    if inferred in passing:
        chosen = inferred
    elif passing:
        chosen = max(passing, key=lambda name: scores[name])
    else:
        why = f"no output of class scores agrees with them ({evidence})" if scores else (
            f"no output has class scores for labels up to {largest}")
        return LabelOutput(None, None, f"labels y unused: {why}; every output is matched to the original's "
                                       f"(--set {OPTION}=NAME trains one on them)")
    return LabelOutput(list(names).index(chosen), chosen, f"labels y train output {chosen} ({evidence}); the "
                                                          "other outputs are matched to the original's", evidence)


def _declared(declared: str, names: Sequence[str], values: Sequence[Any], largest: int | None,
              train: Dataset) -> LabelOutput:
    if declared not in names:
        raise UsageError(f"--set {OPTION}={declared}: the model has no output {declared!r} "
                         f"(its outputs: {', '.join(names)})")
    index = list(names).index(declared)
    classes = class_count(values[index])
    if classes is None:
        shape = "[" + ", ".join(["N", *map(str, values[index].shape[1:])]) + "]"
        raise UsageError(f"--set {OPTION}={declared}: output {declared} is {shape} {values[index].dtype.name}, "
                         "not float class scores [N, C]")
    if largest is None:
        raise UsageError(f"--set {OPTION}={declared}: the labels y are not class indices (integers >= 0)",
                         train.path)
    if largest >= classes:
        raise UsageError(f"--set {OPTION}={declared}: the train data has label {largest}, output {declared} "
                         f"{classes} classes", train.path)
    return LabelOutput(index, declared, f"labels y train output {declared} (--set {OPTION}); the other outputs "
                                        "are matched to the original's" if len(names) > 1 else "", f"--set {OPTION}")
