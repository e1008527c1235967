"""Classification metrics computed the way ``fasttext test`` / ``test-label`` compute them.

fastText's meter skips lines without a label the model knows and ignores gold
labels it does not know, so these numbers match ``model.test(path, k)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

#: How many labels ``labels_changed_most`` lists.
CHANGED_LABELS_SHOWN = 10


def evaluate(
    predicted: Sequence[Sequence[str]],
    gold: Sequence[Sequence[str]],
    known_labels: Collection[str],
    k: int,
) -> dict[str, Any]:
    """Precision@1 (as ``accuracy``), precision@k, recall@k and per-label F1 at k.

    ``predicted`` holds each line's labels best first (at least ``k`` of them
    when the model has that many); ``gold`` each line's true labels.
    """
    at_one = _Meter()
    at_k = _Meter()
    for line_predictions, line_gold in zip(predicted, gold):
        known = [label for label in line_gold if label in known_labels]
        if not known:
            continue
        at_one.log(line_predictions[:1], known)
        at_k.log(line_predictions[:k], known)
    if at_k.examples == 0:
        return {"k": k, "examples_evaluated": 0}
    return {
        "accuracy": at_one.precision(),
        "k": k,
        "precision_at_k": at_k.precision(),
        "recall_at_k": at_k.recall(),
        "per_label_f1": at_k.f1_by_label(),
        "examples_evaluated": at_k.examples,
    }


class _Meter:
    """Counts like fastText's ``Meter::log``."""

    def __init__(self) -> None:
        self.examples = 0
        self.predicted = 0
        self.gold = 0
        self.correct = 0
        self.predicted_by_label: Counter[str] = Counter()
        self.gold_by_label: Counter[str] = Counter()
        self.correct_by_label: Counter[str] = Counter()

    def log(self, predictions: Sequence[str], gold: Sequence[str]) -> None:
        self.examples += 1
        self.predicted += len(predictions)
        self.gold += len(gold)
        wanted = set(gold)
        for label in predictions:
            self.predicted_by_label[label] += 1
            if label in wanted:
                self.correct += 1
                self.correct_by_label[label] += 1
        self.gold_by_label.update(gold)

    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    def recall(self) -> float:
        return self.correct / self.gold if self.gold else 0.0

    def f1_by_label(self) -> dict[str, float]:
        labels = sorted(set(self.predicted_by_label) | set(self.gold_by_label))
        return {
            label: 2 * self.correct_by_label[label]
            / (self.predicted_by_label[label] + self.gold_by_label[label])
            for label in labels
        }


def labels_changed_most(
    reference: Sequence[str], compressed: Sequence[str], limit: int = CHANGED_LABELS_SHOWN
) -> list[dict[str, Any]]:
    """The labels whose top-1 predictions moved most between two models.

    For each label: ``lost`` lines the reference predicted it for and the
    compressed model no longer does, ``gained`` the reverse, and ``predicted``
    how often the reference predicted it. Largest ``lost + gained`` first.
    """
    lost: Counter[str] = Counter()
    gained: Counter[str] = Counter()
    for before, after in zip(reference, compressed):
        if before != after:
            lost[before] += 1
            gained[after] += 1
    predicted = Counter(reference)
    moved = sorted(set(lost) | set(gained), key=lambda label: (-(lost[label] + gained[label]), label))
    return [
        {"label": label, "lost": lost[label], "gained": gained[label], "predicted": predicted[label]}
        for label in moved[:limit]
    ]
